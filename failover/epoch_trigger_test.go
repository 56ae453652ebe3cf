package failover

import (
	"errors"
	"fmt"
	"strings"
	"testing"
	"time"

	"github.com/cockroachdb/datadriven"
)

// TestTriggerScripts runs NextPause through the scripts in
// testdata/trigger: each decide directive is one decision, its expected
// output the decision. -rewrite regenerates the expected output, which
// must then be read, not trusted.
//
// Directives:
//
//	config [interval=D] [max-output-delay=D] [max-pause-fraction=F]
//	decide since=D [tick=D] [held=BYTES age=D] [overlap=D] [in-flight=N] [full]
//	       [pause=D] [per-page=D] [dirty=PAGES_PER_S]
//
// tick is the time to the clock's next pause (default: the interval
// after the last pause, as when no early pause came between).
//
// overlap is how long ago output was last written while earlier output
// still waited (absent: never).
//
// The config's zero fields take EpochConfig's defaults; a decide's
// figures default to nothing held, nothing in flight, a 50 µs pause
// that does not grow with pages and no credit carried from earlier
// epochs.
//
// A trace's pauses replay through the loop's pauseAccount:
//
//	pauses at=D [n=N every=D] total=D [copy=D pages=N] [idle]
//	decide at=D ...
//
// pauses notes n pauses (default 1), the first beginning at at (time
// since the script's start), every apart, each lasting total; its output
// is the account's figures after them. A decide with at takes
// SinceLastPause and the pause-cost figures from the account (its other
// figures as above).
func TestTriggerScripts(t *testing.T) {
	datadriven.Walk(t, "testdata/trigger", func(t *testing.T, path string) {
		var tc TriggerConfig
		var acct pauseAccount
		start := time.Unix(1e9, 0)
		datadriven.RunTest(t, path, func(t *testing.T, d *datadriven.TestData) string {
			switch d.Cmd {
			case "config":
				ec := EpochConfig{Interval: durationArg(t, d, "interval", defaultInterval),
					MaxOutputDelay: durationArg(t, d, "max-output-delay", 0)}
				d.MaybeScanArgs(t, "max-pause-fraction", &ec.MaxPauseFraction)
				if err := ec.Validate(); err != nil {
					return err.Error() + "\n"
				}
				tc = ec.triggerConfig()
				return fmt.Sprintf("interval %v, min interval %v, max output delay %v, max pause fraction %v\n",
					tc.Interval, tc.MinInterval, tc.MaxOutputDelay, tc.MaxPauseFraction)
			case "pauses":
				if tc.Interval == 0 {
					d.Fatalf(t, "config first")
				}
				n, pages := 1, 0
				d.MaybeScanArgs(t, "n", &n)
				d.MaybeScanArgs(t, "pages", &pages)
				at, every := durationArg(t, d, "at", 0), durationArg(t, d, "every", 0)
				for i := range n {
					acct.note(tc, start.Add(at+time.Duration(i)*every), durationArg(t, d, "total", 0),
						durationArg(t, d, "copy", 0), pages, d.HasArg("idle"))
				}
				var in TriggerInput
				acct.fill(&in)
				return fmt.Sprintf("last at %v, fixed %v, per page %v, dirty %.0f/s, credit %v\n",
					acct.last.Sub(start), in.PauseFixed.Round(time.Microsecond), in.PausePerPage, in.DirtyRate, in.Credit.Round(time.Microsecond))
			case "decide":
				if tc.Interval == 0 {
					d.Fatalf(t, "config first")
				}
				since := durationArg(t, d, "since", 0)
				if d.HasArg("at") {
					since = durationArg(t, d, "at", 0) - acct.last.Sub(start)
				}
				in := TriggerInput{SinceLastPause: since, UntilTick: durationArg(t, d, "tick", max(tc.Interval-since, 0)),
					HeldAge:      durationArg(t, d, "age", 0),
					PauseFixed:   durationArg(t, d, "pause", 50*time.Microsecond),
					PausePerPage: durationArg(t, d, "per-page", 0),
					WindowFull:   d.HasArg("full")}
				if d.HasArg("overlap") {
					in.Overlapped, in.OverlapAge = true, durationArg(t, d, "overlap", 0)
				}
				d.MaybeScanArgs(t, "held", &in.HeldBytes)
				d.MaybeScanArgs(t, "in-flight", &in.InFlight)
				d.MaybeScanArgs(t, "dirty", &in.DirtyRate)
				if d.HasArg("at") {
					acct.fill(&in)
				}
				return NextPause(tc, in).String() + "\n"
			}
			d.Fatalf(t, "unknown directive %q", d.Cmd)
			return ""
		})
	})
}

// TestEpochConfigValidate pins the accepted ranges the command line's
// --max-output-delay and --max-pause-fraction report.
func TestEpochConfigValidate(t *testing.T) {
	for _, c := range []struct {
		cfg  EpochConfig
		want string // "" valid, else a part of the error
	}{
		{EpochConfig{}, ""},
		{EpochConfig{MaxOutputDelay: time.Millisecond}, ""},
		{EpochConfig{MaxOutputDelay: 25 * time.Millisecond}, ""},
		{EpochConfig{MaxOutputDelay: 999 * time.Microsecond}, "outside [1ms, 25ms]"},
		{EpochConfig{MaxOutputDelay: 26 * time.Millisecond}, "outside [1ms, 25ms]"},
		{EpochConfig{Interval: 10 * time.Millisecond, MaxOutputDelay: 11 * time.Millisecond}, "outside [1ms, 10ms]"},
		{EpochConfig{MaxOutputDelay: -time.Millisecond}, "outside [1ms, 25ms]"},
		{EpochConfig{MaxPauseFraction: 1}, ""},
		{EpochConfig{MaxPauseFraction: 0.001}, ""},
		{EpochConfig{MaxPauseFraction: 1.01}, "outside (0, 1]"},
		{EpochConfig{MaxPauseFraction: -0.1}, "outside (0, 1]"},
		{EpochConfig{Trigger: 7}, "epoch trigger 7"},
	} {
		err := c.cfg.Validate()
		switch {
		case c.want == "" && err != nil:
			t.Errorf("%+v: %v, want valid", c.cfg, err)
		case c.want != "" && (err == nil || !strings.Contains(err.Error(), c.want) || !errors.Is(err, ErrBadEpochConfig)):
			t.Errorf("%+v: %v, want ErrBadEpochConfig saying %q", c.cfg, err, c.want)
		}
	}
	for in, want := range map[string]EpochTrigger{"clock": TriggerClock, "output": TriggerOutput} {
		if got, err := ParseEpochTrigger(in); err != nil || got != want || got.String() != in {
			t.Errorf("ParseEpochTrigger(%q) = %v, %v", in, got, err)
		}
	}
	if _, err := ParseEpochTrigger("fast"); err == nil || !errors.Is(err, ErrBadEpochConfig) || !strings.Contains(err.Error(), "want clock or output") {
		t.Errorf("ParseEpochTrigger(fast): %v", err)
	}
	// Zero is the default, not a bad value; a NaN fraction is refused.
	if err := CheckMaxPauseFraction(0); err == nil {
		t.Error("a pause fraction of 0 accepted by the flag's check")
	}
	nan := 0.0
	if err := CheckMaxPauseFraction(nan / nan); err == nil {
		t.Error("NaN accepted")
	}
}
