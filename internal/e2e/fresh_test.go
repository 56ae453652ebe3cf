package e2e

import (
	"context"
	"errors"
	"os"
	"strings"
	"testing"
)

func TestStartFresh(t *testing.T) {
	dir := t.TempDir()
	ready := func(ctx context.Context, api string) error { return nil }
	f, err := StartFresh(context.Background(), FreshOptions{Name: "ok", Argv: []string{"sh", "-c", "exec sleep 30"}, LogDir: dir, Listen: true, Ready: ready})
	if err != nil {
		t.Fatal(err)
	}
	defer f.Proc.Kill()
	if f.API == "" || f.Console == "" || f.Listen == "" || f.API == f.Console {
		t.Fatalf("addresses %+v", f)
	}

	// A node that lost a port race is started again, three times at most.
	never := func(ctx context.Context, api string) error { return errors.New("no answer") }
	var tries int
	_, err = StartFresh(context.Background(), FreshOptions{Name: "clash", Argv: []string{"sh", "-c", "echo listen: address already in use; exit 1"},
		LogDir: dir, Ready: never, OnAddrs: func(string, string) { tries++ }})
	if err == nil || tries != 3 {
		t.Fatalf("after %d tries: %v", tries, err)
	}
	// Any other failure ends it at once, with the log.
	tries = 0
	_, err = StartFresh(context.Background(), FreshOptions{Name: "bad", Argv: []string{"sh", "-c", "echo bad flag; exit 2"},
		LogDir: dir, Ready: never, OnAddrs: func(string, string) { tries++ }})
	if err == nil || tries != 1 || !strings.Contains(err.Error(), "bad flag") {
		t.Fatalf("after %d tries: %v", tries, err)
	}
	if _, err := os.Stat(dir + "/clash-2.log"); err != nil {
		t.Fatalf("each attempt logs to its own file: %v", err)
	}
}
