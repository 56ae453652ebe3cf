package test

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
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
		// Interrupted as soon as its network exists: the part after it
		// runs about 3 s, so a loaded host's late read of the line still
		// finds the demo running (at the later "each reply frame" line,
		// once, it had finished by the time the test read it).
		_, br, ns := runDemo(t, "network: a bridge")
		checkGone(t, br, ns)
	})
}

// demoDataLine is the demo's line naming its first trio's directory.
var demoDataLine = regexp.MustCompile(`\(data in (\S+)\)`)

// runDemo runs the demo to its end, or interrupts it once a line with
// interruptAt appears ("": never) as a Ctrl-C would: SIGINT to its
// process group. It returns its output with the bridge and namespace it
// said it made, and checks the demo left no process and no link of its
// own behind.
func runDemo(t *testing.T, interruptAt string) (out, bridge, ns string) {
	// Five minutes: the test runs in parallel on two loaded cores.
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	cmd := exec.CommandContext(ctx, tandemBin, "demo", "--plaintext", "--guest", "synth")
	cmd.Dir = t.TempDir()
	// Its own temp dir: every node it starts has its data there, so a
	// node left running is found by its command line.
	tmp := t.TempDir()
	cmd.Env = append(os.Environ(), "TMPDIR="+tmp)
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true} // a group of its own, as a shell's job
	cmd.Cancel = func() error { return syscall.Kill(-cmd.Process.Pid, syscall.SIGKILL) }
	pipe, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	cmd.Stderr = cmd.Stdout
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	var b strings.Builder
	var dataDir string
	lateInterrupt := false // the demo's group had ended before the SIGINT
	sc := bufio.NewScanner(pipe)
	for sc.Scan() {
		line := sc.Text()
		b.WriteString(line + "\n")
		if m := netDemoLine.FindStringSubmatch(line); m != nil {
			bridge, ns = m[1], m[2]
		}
		if m := demoDataLine.FindStringSubmatch(line); m != nil && dataDir == "" {
			dataDir = m[1]
		}
		if interruptAt != "" && strings.Contains(line, interruptAt) {
			// Ctrl-C: the whole foreground group.
			if err := syscall.Kill(-cmd.Process.Pid, syscall.SIGINT); errors.Is(err, syscall.ESRCH) {
				lateInterrupt = true
			}
		}
	}
	err = cmd.Wait()
	out = b.String()
	if interruptAt == "" && err != nil {
		t.Fatalf("demo: %v\n%s", err, out)
	}
	if interruptAt != "" && err == nil {
		if lateInterrupt {
			t.Logf("the demo had ended before the test read %q: not interrupted (cleanup still checked)", interruptAt)
		} else {
			t.Errorf("the interrupted demo exited 0:\n%s", out)
		}
	}
	if bridge == "" {
		t.Fatalf("the demo did not say which network it made:\n%s", out)
	}
	checkNoLeftovers(t, cmd.Process.Pid, tmp)
	if interruptAt == "" {
		if _, err := os.Stat(dataDir); dataDir == "" || !os.IsNotExist(err) {
			t.Errorf("the completed demo's data dir %q is still there (%v)", dataDir, err)
		}
	}
	return out, bridge, ns
}

// checkNoLeftovers fails t if a process started with tmp in its command
// line (a node of the demo) still runs, or if a link named on the demo's
// prefix (tn, its pid mod 100000, a letter: bridge, veth or TAP) exists.
func checkNoLeftovers(t *testing.T, pid int, tmp string) {
	t.Helper()
	procs, _ := filepath.Glob("/proc/[0-9]*/cmdline")
	for _, p := range procs {
		b, err := os.ReadFile(p)
		if err == nil && strings.Contains(string(b), tmp) {
			t.Errorf("a process of the demo still runs: %s: %s", p, strings.ReplaceAll(string(b), "\x00", " "))
		}
	}
	ifs, err := net.Interfaces()
	if err != nil {
		t.Fatal(err)
	}
	own := regexp.MustCompile(fmt.Sprintf(`^tn%d[a-z]`, pid%100000))
	for _, i := range ifs {
		if own.MatchString(i.Name) {
			t.Errorf("link %s (the demo's) still exists after it ended", i.Name)
		}
	}
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
