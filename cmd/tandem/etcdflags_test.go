package main

import (
	"bytes"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

// Bad --coordinator etcd command lines are one line naming the flag,
// exit 2, and create nothing (the data directory stays absent).
func TestEtcdFlagsRefused(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "data")
	base := []string{"--coordinator", "etcd", "--cluster", "g1", "--id", "a", "--data", "127.0.0.1:7311", "--data-dir", dir,
		"--api", "127.0.0.1:0", "--console", "127.0.0.1:0"}
	for _, tc := range []struct {
		cmd   string
		extra []string
		want  string
	}{
		{"primary", []string{"--coordinator", "zk"}, "--coordinator"},
		{"primary", nil, "--etcd-endpoints"},
		{"secondary", []string{"--etcd-endpoints", "http://127.0.0.1:2379", "--peers", "a=127.0.0.1:1,b=127.0.0.1:2,w=127.0.0.1:3"}, "--peers"},
		{"primary", []string{"--etcd-endpoints", "127.0.0.1:2379"}, "--etcd-endpoints"},
		{"primary", []string{"--etcd-endpoints", "https://127.0.0.1:2379"}, "--tls-ca"},
		{"primary", []string{"--etcd-endpoints", "http://10.9.8.7:2379"}, "--etcd-endpoints"},
		{"secondary", []string{"--etcd-endpoints", "http://127.0.0.1:2379", "--cluster", "a/b"}, "--cluster"},
		{"secondary", []string{"--etcd-endpoints", "http://127.0.0.1:2379", "--etcd-lease", "1500ms"}, "--etcd-lease"},
	} {
		args := append([]string{tc.cmd}, base...)
		if tc.cmd == "primary" {
			args = append(args, "--guest", "synth")
		}
		args = append(args, tc.extra...)
		var out, errb bytes.Buffer
		rc := app.Main(args, &out, &errb)
		if rc != 2 || strings.Count(errb.String(), "\n") != 1 || !strings.Contains(errb.String(), tc.want) {
			t.Errorf("%s %v: exit %d, %q; want exit 2, one line naming %s", tc.cmd, tc.extra, rc, errb.String(), tc.want)
		}
		if _, err := os.Stat(dir); err == nil {
			t.Fatalf("%s %v created %s", tc.cmd, tc.extra, dir)
		}
	}
	var out, errb bytes.Buffer
	if rc := app.Main([]string{"primary", "--guest", "synth", "--cluster", "g1"}, &out, &errb); rc != 2 || !strings.Contains(errb.String(), "--coordinator etcd") {
		t.Errorf("--cluster without --coordinator etcd: exit %d, %q", rc, errb.String())
	}
}
