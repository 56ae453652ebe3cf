package main

import (
	"bytes"
	"net"
	"strings"
	"testing"

	"github.com/tandemvm/tandem/internal/version"
)

// Every command's -h starts with its synopsis, on stdout, and exits 0.
func TestHelpSynopsis(t *testing.T) {
	for name := range app.Commands {
		var out, errb bytes.Buffer
		if rc := app.Main([]string{name, "-h"}, &out, &errb); rc != 0 {
			t.Errorf("%s -h: exit %d, stderr %q", name, rc, errb.String())
			continue
		}
		if first, _, _ := strings.Cut(out.String(), "\n"); !strings.HasPrefix(first, "usage: tandem "+name) {
			t.Errorf("%s -h: first line %q", name, first)
		}
	}
	var out, errb bytes.Buffer
	if rc := app.Main([]string{"help"}, &out, &errb); rc != 0 || !strings.HasPrefix(out.String(), "usage: tandem COMMAND") || errb.Len() != 0 {
		t.Errorf("tandem help: exit %d, stdout %q, stderr %q", rc, out.String(), errb.String())
	}
}

func TestVersion(t *testing.T) {
	var out, errb bytes.Buffer
	if rc := app.Main([]string{"version"}, &out, &errb); rc != 0 || strings.TrimSpace(out.String()) != version.Build() {
		t.Errorf("tandem version: exit %d, %q", rc, out.String())
	}
}

// Flags may follow a positional argument (the README's order), and a
// stray argument is still one line, exit 2.
func TestFlagsAfterPositional(t *testing.T) {
	var out, errb bytes.Buffer
	rc := app.Main([]string{"analyze", "/nonexistent/stream", "--json"}, &out, &errb)
	if rc != 1 || strings.Contains(errb.String(), "unexpected argument") {
		t.Errorf("analyze FILE --json: exit %d, %q", rc, errb.String())
	}
	errb.Reset()
	rc = app.Main([]string{"analyze", "a", "b"}, &out, &errb)
	if rc != 2 || strings.Count(errb.String(), "\n") != 1 {
		t.Errorf("analyze a b: exit %d, %q", rc, errb.String())
	}
	errb.Reset()
	rc = app.Main([]string{"witness", "--log-level", "loud"}, &out, &errb)
	if rc != 2 || strings.Count(errb.String(), "\n") != 1 {
		t.Errorf("--log-level loud: exit %d, %q", rc, errb.String())
	}
}

// A pair primary without TLS flags refuses to stream to a secondary
// across the network unless --insecure says so: one line, exit 2, before
// the guest boots.
func TestPlaintextSecondaryRefused(t *testing.T) {
	var out, errb bytes.Buffer
	rc := app.Main([]string{"primary", "--guest", "synth", "--secondary", "192.0.2.1:7092"}, &out, &errb)
	if rc != 2 || strings.Count(errb.String(), "\n") != 1 || !strings.Contains(errb.String(), "--secondary 192.0.2.1:7092") || !strings.Contains(errb.String(), "--insecure") {
		t.Errorf("plaintext --secondary off loopback: exit %d, stderr %q", rc, errb.String())
	}
}

// A bad --net, a bridge that does not exist, a bad --guest-ip or
// --guest-mac on either guest: one line, exit 2, before anything starts.
func TestNetFlagRefusals(t *testing.T) {
	for _, args := range [][]string{
		{"run", "--guest", "synth", "--net", "eth0"},
		{"run", "--guest", "synth", "--net", "tap:tdtcli0,bridge=tdt-no-such-br"},
		{"run", "--guest", "synth", "--guest-ip", "10.0.0.0/24"},
		{"run", "--guest", "kvm", "--guest-ip", "10.0.0.10/24", "--guest-mac", "01:00:5e:00:00:01"},
		{"run", "--guest", "kvm", "--guest-ip", "300.0.0.10/24"},
		{"run", "--guest", "synth", "--guest-ip", "10.0.0.10/24", "--kv-port", "0"},
	} {
		var out, errb bytes.Buffer
		if rc := app.Main(args, &out, &errb); rc != 2 || strings.Count(errb.String(), "\n") != 1 {
			t.Errorf("%v: exit %d, stderr %q", args, rc, errb.String())
		}
	}
}

// Every command that has --api defaults to the same address, and a
// refused connection says so in one line (issue 20: a bare tandem status
// got "connection refused" because each command had its own default).
func TestOneDefaultAPI(t *testing.T) {
	for name := range app.Commands {
		var out, errb bytes.Buffer
		app.Main([]string{name, "-h"}, &out, &errb)
		lines := strings.Split(out.String(), "\n")
		for i, l := range lines {
			if strings.TrimSpace(l) != "-api string" {
				continue
			}
			if i+1 >= len(lines) || !strings.HasSuffix(lines[i+1], "(default \""+defaultAPI+"\")") {
				t.Errorf("%s -h: --api without the default %s", name, defaultAPI)
			}
		}
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := ln.Addr().String()
	ln.Close() // nothing listens there now
	var out, errb bytes.Buffer
	rc := app.Main([]string{"status", "--api", addr}, &out, &errb)
	want := "tandem status: no tandem API at " + addr + " (connection refused): give the --api address of a running node\n"
	if rc != 1 || errb.String() != want {
		t.Errorf("status against a closed port: exit %d, %q, want %q", rc, errb.String(), want)
	}
}
