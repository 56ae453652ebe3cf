package test

import (
	"bufio"
	"context"
	"os/exec"
	"regexp"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/tandemvm/tandem/internal/labnet"
)

// netDemoLine is the demo's line naming the network it made.
var netDemoLine = regexp.MustCompile(`network: a bridge (\S+) and a client namespace (\S+) at`)

// TestDemoNetwork: `tandem demo` (as root) shows the network path: a
// client in a namespace talks to the guest's IP over UDP, the primary is
// killed, the same IP answers with every acknowledged write; and the
// bridge and namespace it made are gone when it ends, whether it
// finished or was interrupted (Ctrl-C) in the middle of the network part.
func TestDemoNetwork(t *testing.T) {
	if err := labnet.Usable(); err != nil {
		t.Skip(err)
	}
	t.Parallel()
	t.Run("complete", func(t *testing.T) {
		out, br, ns := runDemo(t, "")
		for _, want := range []string{"guest> OK hello", "SIGKILL to the primary a", "gap: the first reply at the same address came", "writes acknowledged over UDP are there", "demo done"} {
			if !strings.Contains(out, want) {
				t.Errorf("the demo's output lacks %q:\n%s", want, out)
			}
		}
		checkGone(t, br, ns)
	})
	t.Run("interrupted", func(t *testing.T) {
		_, br, ns := runDemo(t, "each reply frame left a's TAP")
		checkGone(t, br, ns)
	})
}

// runDemo runs the demo to its end, or sends it SIGINT once a line with
// interruptAt appears ("": never), and returns its output with the
// bridge and namespace it said it made.
func runDemo(t *testing.T, interruptAt string) (out, bridge, ns string) {
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	cmd := exec.CommandContext(ctx, tandemBin, "demo", "--plaintext", "--guest", "synth")
	cmd.Dir = t.TempDir()
	pipe, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	cmd.Stderr = cmd.Stdout
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	var b strings.Builder
	sc := bufio.NewScanner(pipe)
	for sc.Scan() {
		line := sc.Text()
		b.WriteString(line + "\n")
		if m := netDemoLine.FindStringSubmatch(line); m != nil {
			bridge, ns = m[1], m[2]
		}
		if interruptAt != "" && strings.Contains(line, interruptAt) {
			cmd.Process.Signal(syscall.SIGINT)
		}
	}
	err = cmd.Wait()
	out = b.String()
	if interruptAt == "" && err != nil {
		t.Fatalf("demo: %v\n%s", err, out)
	}
	if interruptAt != "" && err == nil {
		t.Errorf("the interrupted demo exited 0:\n%s", out)
	}
	if bridge == "" {
		t.Fatalf("the demo did not say which network it made:\n%s", out)
	}
	return out, bridge, ns
}

// checkGone fails t if the bridge or the namespace still exists.
func checkGone(t *testing.T, bridge, ns string) {
	t.Helper()
	if out, err := exec.Command("ip", "link", "show", bridge).CombinedOutput(); err == nil {
		t.Errorf("bridge %s still exists after the demo:\n%s", bridge, out)
	}
	if out, _ := exec.Command("ip", "netns", "list").CombinedOutput(); strings.Contains(string(out), ns) {
		t.Errorf("namespace %s still exists after the demo:\n%s", ns, out)
	}
}
