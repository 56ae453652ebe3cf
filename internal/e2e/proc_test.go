package e2e

import (
	"net"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"
)

func TestFreeAddrNeverTwice(t *testing.T) {
	seen := map[string]bool{}
	for range 50 {
		a, err := FreeAddr()
		if err != nil {
			t.Fatal(err)
		}
		if seen[a] {
			t.Fatalf("%s handed out twice", a)
		}
		seen[a] = true
		// Outside the kernel's ephemeral range, where a ":0" listener or
		// an outgoing connection could take it in between.
		if lo, hi := belowEphemeral(); hi > lo {
			_, port, _ := net.SplitHostPort(a)
			if p, _ := strconv.Atoi(port); p < lo || p >= hi {
				t.Fatalf("%s outside [%d, %d)", a, lo, hi)
			}
		}
	}
	if !PortClash("listen tcp 127.0.0.1:7: bind: address already in use") || PortClash("connection refused") {
		t.Fatal("PortClash")
	}
}

// waitFor polls cond every 10 ms for at most 5 s.
func waitFor(t *testing.T, what string, cond func() bool) {
	t.Helper()
	for deadline := time.Now().Add(5 * time.Second); !cond(); time.Sleep(10 * time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatalf("not %s after 5 s", what)
		}
	}
}

func TestProcKillAndTail(t *testing.T) {
	p, err := StartProc("sh", filepath.Join(t.TempDir(), "sh.log"), "sh", "-c", "echo one; echo two; exec sleep 30")
	if err != nil {
		t.Fatal(err)
	}
	defer p.Kill()
	waitFor(t, "logged", func() bool { return p.Tail(1) == "two" })
	if !p.Running() || p.WaitErr() != nil || p.ProcessState() != nil {
		t.Fatal("a sleeping process does not run")
	}
	if err := p.Kill(); err != nil {
		t.Fatal(err)
	}
	if p.Running() || p.WaitErr() == nil || p.ProcessState() == nil {
		t.Fatalf("after Kill: running %v, wait error %v", p.Running(), p.WaitErr())
	}
	if got := p.Tail(5); got != "one\ntwo" {
		t.Fatalf("tail %q", got)
	}
}

func TestProcStopKillsTheGroup(t *testing.T) {
	// The shell's child sleeps in the same process group: Stop must end
	// both, or the pipe's writer would keep the log open.
	p, err := StartProc("sh", filepath.Join(t.TempDir(), "sh.log"), "sh", "-c", "sleep 30 & wait")
	if err != nil {
		t.Fatal(err)
	}
	defer p.Kill()
	t0 := time.Now()
	if err := p.Stop(syscall.SIGTERM); err != nil {
		t.Fatal(err)
	}
	if p.Running() || time.Since(t0) > 5*time.Second {
		t.Fatalf("running %v after %v", p.Running(), time.Since(t0))
	}
	if _, err := StartProc("none", filepath.Join(t.TempDir(), "x.log")); err == nil {
		t.Fatal("a process without a command")
	}
}

func TestTrioArgs(t *testing.T) {
	addrs := map[string]Addrs{
		"a": {Raft: "10.0.0.1:1", Data: "10.0.0.1:2", API: "10.0.0.1:3", Console: "10.0.0.1:4"},
		"b": {Raft: "10.0.0.2:1", Data: "10.0.0.2:2", API: "10.0.0.2:3", Console: "10.0.0.2:4"},
		"w": {Raft: "10.0.0.3:1", Data: "10.0.0.3:2", API: "10.0.0.3:3", Console: "10.0.0.3:4"},
	}
	tr, err := NewTrio(TrioConfig{Bin: "tandem", Dir: "/d", Guest: "synth", CertDir: "/certs", Extra: []string{"--x"}, Addrs: addrs})
	if err != nil {
		t.Fatal(err)
	}
	tr.Node("b").Extra = []string{"--data-advertise", "10.9.9.9:2"}
	want := map[string]string{
		"a": "primary --id a --raft 10.0.0.1:1 --peers a=10.0.0.1:1,b=10.0.0.2:1,w=10.0.0.3:1 --data-dir /d/a --api 10.0.0.1:3 --data 10.0.0.1:2 --console 10.0.0.1:4 --guest synth --memory 128MiB --workload kv --tls-ca /certs/ca.pem --tls-cert /certs/a.pem --tls-key /certs/a-key.pem --x",
		"b": "secondary --id b --raft 10.0.0.2:1 --peers a=10.0.0.1:1,b=10.0.0.2:1,w=10.0.0.3:1 --data-dir /d/b --api 10.0.0.2:3 --data 10.0.0.2:2 --console 10.0.0.2:4 --tls-ca /certs/ca.pem --tls-cert /certs/b.pem --tls-key /certs/b-key.pem --x --data-advertise 10.9.9.9:2",
		"w": "witness --id w --raft 10.0.0.3:1 --peers a=10.0.0.1:1,b=10.0.0.2:1,w=10.0.0.3:1 --data-dir /d/w --api 10.0.0.3:3 --tls-ca /certs/ca.pem --tls-cert /certs/w.pem --tls-key /certs/w-key.pem --x",
	}
	for id, w := range want {
		if got := strings.Join(tr.Args(tr.Node(id)), " "); got != w {
			t.Errorf("%s:\n got %s\nwant %s", id, got, w)
		}
	}
	if cs := tr.Consoles(); !slices.Equal(cs, []string{"10.0.0.1:4", "10.0.0.2:4"}) {
		t.Errorf("consoles %v: a witness has none", cs)
	}
	if tr.Node("x") != nil || tr.Node("w").Running() || tr.Node("w").Kill() != nil {
		t.Error("an unstarted node")
	}
}
