package failover

import (
	"fmt"
	"strings"
	"testing"
	"time"

	"github.com/cockroachdb/datadriven"
)

// TestProtectionScripts runs the protection state machine through the
// scripts in testdata/protection, etcd-raft style: each directive is one
// event (or a query), its expected output the actions the machine
// returned, one a line. A changed decision fails the script; -rewrite
// regenerates the expected output, which must then be read, not trusted.
//
// Directives (times are offsets t=DURATION from the script's start; a
// reason, where one is taken, is the directive's input block):
//
//	init [verify] [max-in-flight=N] [ack-timeout=D] [final-timeout=D]
//	no-secondary | secondary-changed | join-done | pause | captured | capture-failed
//	join addr=A epoch=N t=D          link-down [unreached] (why)
//	sent epoch=N t=D                 ship epoch=N gate=G [digest=X] t=D
//	epoch n=N gate=G [digest=X] t=D  (pause, captured, ship, sent)
//	ack epoch=N sent=N [digest=X] [error=X] [activated] t=D
//	mismatch epoch=N (detail)        relink (why)
//	final | final-shipped t=D | final-abandoned | tick t=D | fenced (why)
//	status                           (state, figures and deadlines)
func TestProtectionScripts(t *testing.T) {
	datadriven.Walk(t, "testdata/protection", func(t *testing.T, path string) {
		var p *Protection
		base := time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC)
		datadriven.RunTest(t, path, func(t *testing.T, d *datadriven.TestData) string {
			if d.Cmd == "init" {
				cfg := ProtectionConfig{Verify: d.HasArg("verify"), MaxInFlight: 4,
					AckTimeout: 10 * time.Second, FinalTimeout: 10 * time.Second}
				d.MaybeScanArgs(t, "max-in-flight", &cfg.MaxInFlight)
				cfg.AckTimeout = durationArg(t, d, "ack-timeout", cfg.AckTimeout)
				cfg.FinalTimeout = durationArg(t, d, "final-timeout", cfg.FinalTimeout)
				p = NewProtection(cfg)
				return protectionStatus(p, base)
			}
			if p == nil {
				d.Fatalf(t, "init first")
			}
			if d.Cmd == "status" {
				return protectionStatus(p, base)
			}
			var out []string
			for _, ev := range scriptEvents(t, d, base) {
				for _, a := range p.Step(ev) {
					out = append(out, a.String())
				}
			}
			if len(out) == 0 {
				return "ok\n"
			}
			return strings.Join(out, "\n") + "\n"
		})
	})
}

// scriptEvents turns one directive into the events it stands for.
func scriptEvents(t *testing.T, d *datadriven.TestData, base time.Time) []ProtectionEvent {
	ev := ProtectionEvent{Now: base.Add(durationArg(t, d, "t", 0)), Why: strings.TrimSpace(d.Input), Unreached: d.HasArg("unreached")}
	d.MaybeScanArgs(t, "epoch", &ev.Epoch)
	d.MaybeScanArgs(t, "sent", &ev.Sent)
	d.MaybeScanArgs(t, "digest", &ev.Digest)
	d.MaybeScanArgs(t, "addr", &ev.Addr)
	kinds := map[string]ProtectionEventKind{"no-secondary": EvNoSecondary, "secondary-changed": EvSecondaryChanged,
		"join": EvJoinStart, "join-done": EvJoinDone, "link-down": EvLinkDown, "sent": EvSent, "pause": EvPause,
		"captured": EvCaptured, "capture-failed": EvCaptureFailed, "ship": EvShipping, "ack": EvAck, "mismatch": EvMismatch, "relink": EvRelink,
		"final": EvFinalRequested, "final-shipped": EvFinalShipped, "final-abandoned": EvFinalAbandoned,
		"tick": EvTick, "fenced": EvFenced}
	switch d.Cmd {
	case "ship":
		d.ScanArgs(t, "gate", &ev.Flight.GateEpoch)
		ev.Flight.Digest, ev.Flight.PausedAt, ev.Digest = ev.Digest, ev.Now, ""
	case "ack":
		if d.HasArg("error") {
			d.ScanArgs(t, "error", &ev.Why)
		}
		ev.Activated = d.HasArg("activated")
	case "epoch":
		// One whole epoch: its pause, its capture, its registration as a
		// flight and its end on the wire.
		var n, gate uint64
		d.ScanArgs(t, "n", &n)
		d.ScanArgs(t, "gate", &gate)
		fl := Flight{GateEpoch: gate, Digest: ev.Digest, PausedAt: ev.Now}
		return []ProtectionEvent{{Kind: EvPause, Now: ev.Now}, {Kind: EvCaptured, Now: ev.Now},
			{Kind: EvShipping, Epoch: n, Flight: fl, Now: ev.Now}, {Kind: EvSent, Epoch: n, Now: ev.Now}}
	}
	k, ok := kinds[d.Cmd]
	if !ok {
		d.Fatalf(t, "unknown directive %q", d.Cmd)
	}
	ev.Kind = k
	return []ProtectionEvent{ev}
}

func durationArg(t *testing.T, d *datadriven.TestData, key string, def time.Duration) time.Duration {
	var s string
	if !d.MaybeScanArgs(t, key, &s) {
		return def
	}
	v, err := time.ParseDuration(s)
	if err != nil {
		d.Fatalf(t, "%s: %v", key, err)
	}
	return v
}

// protectionStatus prints what the machine holds, times as offsets.
func protectionStatus(p *Protection, base time.Time) string {
	state, why := p.State()
	var b strings.Builder
	fmt.Fprintf(&b, "state %s: %s\n", state, why)
	fmt.Fprintf(&b, "committed %d, in flight %d, may capture %v\n", p.Committed(), p.InFlight(), p.MayCapture())
	if at, ok := p.AckDeadline(); ok {
		fmt.Fprintf(&b, "ack deadline t=%v\n", at.Sub(base))
	}
	if at, ok := p.FinalDeadline(); ok {
		fmt.Fprintf(&b, "final deadline t=%v\n", at.Sub(base))
	}
	if done, failure := p.FinalDone(); done && failure == "" {
		fmt.Fprintf(&b, "final acknowledged\n")
	} else if done {
		fmt.Fprintf(&b, "final failed: %s\n", failure)
	}
	return b.String()
}
