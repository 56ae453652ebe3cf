package main

import (
	"errors"
	"flag"
	"io"
	"strings"
	"testing"
	"time"

	"github.com/tandemvm/tandem/failover"
)

func parseEpochFlags(t *testing.T, args ...string) (epochFlags, error) {
	t.Helper()
	fs := flag.NewFlagSet("primary", flag.ContinueOnError)
	fs.SetOutput(io.Discard)
	var ef epochFlags
	addEpochFlags(fs, &ef)
	if err := fs.Parse(args); err != nil {
		return ef, err
	}
	return ef, ef.validate()
}

func TestEpochTriggerFlags(t *testing.T) {
	ef, err := parseEpochFlags(t)
	if err != nil {
		t.Fatalf("defaults refused: %v", err)
	}
	if s := ef.settings(); s.Trigger != failover.TriggerClock || s.MaxOutputDelay != failover.DefaultMaxOutputDelay || s.MaxPauseFraction != failover.DefaultMaxPauseFraction {
		t.Fatalf("default settings %+v", s)
	}
	ef, err = parseEpochFlags(t, "--epoch-trigger", "output", "--max-output-delay", "3ms", "--max-pause-fraction", "0.3")
	if err != nil {
		t.Fatal(err)
	}
	if s := ef.settings(); s.Trigger != failover.TriggerOutput || s.MaxOutputDelay != 3*time.Millisecond || s.MaxPauseFraction != 0.3 {
		t.Fatalf("settings %+v", s)
	}
	for _, bad := range []struct {
		args []string
		want string
	}{
		{[]string{"--max-output-delay", "0"}, "--max-output-delay"},
		{[]string{"--max-output-delay", "30ms"}, "--max-output-delay"}, // above the 25 ms epoch
		{[]string{"--epoch", "10ms", "--max-output-delay", "11ms"}, "--max-output-delay"},
		{[]string{"--max-pause-fraction", "0"}, "--max-pause-fraction"},
		{[]string{"--max-pause-fraction", "1.01"}, "--max-pause-fraction"},
		{[]string{"--epoch-trigger", "sometimes"}, "clock or output"},
	} {
		_, err := parseEpochFlags(t, bad.args...)
		if err == nil || !strings.Contains(err.Error(), bad.want) || strings.Contains(err.Error(), "\n") {
			t.Errorf("%v: err %v, want one line naming %s", bad.args, err, bad.want)
		}
		var ue usageError
		if err != nil && !strings.Contains(bad.want, "clock") && !errors.As(err, &ue) {
			t.Errorf("%v: %v is not a usage error (exit 2)", bad.args, err)
		}
	}
}
