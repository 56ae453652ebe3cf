package top

import (
	"bytes"
	"math"
	"strconv"
	"strings"
	"testing"
	"time"

	dto "github.com/prometheus/client_model/go"
	"github.com/prometheus/common/expfmt"
	"github.com/prometheus/common/model"
	"github.com/tandemvm/tandem/api"
)

func parse(t *testing.T, text string) map[string]*dto.MetricFamily {
	t.Helper()
	p := expfmt.NewTextParser(model.UTF8Validation)
	fams, err := p.TextToMetricFamilies(strings.NewReader(text))
	if err != nil {
		t.Fatal(err)
	}
	return fams
}

// hist writes one histogram series with cumulative counts at 1ms, 100ms, 1s.
func hist(family, labels string, c1ms, c100ms, c1s uint64) string {
	var b strings.Builder
	b.WriteString("# TYPE " + family + " histogram\n")
	for _, x := range []struct {
		le string
		n  uint64
	}{{"0.001", c1ms}, {"0.1", c100ms}, {"1", c1s}, {"+Inf", c1s}} {
		b.WriteString(family + "_bucket{" + labels + `,le="` + x.le + `"} ` + itoa(x.n) + "\n")
	}
	b.WriteString(family + "_sum{" + labels + "} 1\n")
	b.WriteString(family + "_count{" + labels + "} " + itoa(c1s) + "\n")
	return b.String()
}

func itoa(n uint64) string { return strconv.FormatUint(n, 10) }

func TestRankUsesTheInterval(t *testing.T) {
	prev := Sample{At: time.Unix(100, 0), Metrics: parse(t, hist("tandem_phase_seconds", `phase="flush"`, 1000, 1000, 1000))}
	// 10 more flushes, all between 100 ms and 1 s: the interval's p50 and
	// p99 are in the 1 s bucket although the lifetime's are at 1 ms.
	cur := Sample{At: time.Unix(101, 0), Metrics: parse(t, hist("tandem_phase_seconds", `phase="flush"`, 1000, 1000, 1010))}
	rows := Rank(prev, cur)
	if len(rows) != 1 || rows[0].Name != "flush" || rows[0].Count != 10 || rows[0].P50 != 1 || rows[0].P99 != 1 {
		t.Fatalf("rows %+v, want flush: 10 in the interval, p50 = p99 = 1s bucket", rows)
	}
	if rows := Rank(cur, cur); len(rows) != 0 {
		t.Fatalf("an interval without observations ranks %+v", rows)
	}
}

func TestRankOrdersAndSurvivesRestart(t *testing.T) {
	prevText := hist("tandem_vcpu_exit_seconds", `reason="io",handler="disk.submit"`, 0, 500, 500)
	curText := hist("tandem_vcpu_exit_seconds", `reason="io",handler="disk.submit"`, 0, 0, 3) + // restarted: fewer than before
		strings.Replace(hist("tandem_vcpu_exit_seconds", `reason="io",handler="uart.out"`, 100, 100, 100), "# TYPE tandem_vcpu_exit_seconds histogram\n", "", 1)
	rows := Rank(Sample{Metrics: parse(t, prevText)}, Sample{Metrics: parse(t, curText)})
	if len(rows) != 2 {
		t.Fatalf("rows %+v, want 2", rows)
	}
	if rows[0].Name != "io disk.submit" || rows[0].Count != 3 || rows[0].P99 != 1 {
		t.Fatalf("first row %+v, want the restarted disk.submit with its 3 slow exits", rows[0])
	}
	if rows[1].Name != "io uart.out" || rows[1].P99 != 0.001 {
		t.Fatalf("second row %+v, want uart.out at <= 1ms", rows[1])
	}
}

func TestRankOverflowBucket(t *testing.T) {
	text := `# TYPE tandem_phase_seconds histogram
tandem_phase_seconds_bucket{phase="send",le="1"} 0
tandem_phase_seconds_bucket{phase="send",le="+Inf"} 4
tandem_phase_seconds_sum{phase="send"} 200
tandem_phase_seconds_count{phase="send"} 4
`
	rows := Rank(Sample{}, Sample{Metrics: parse(t, text)})
	if len(rows) != 1 || !math.IsInf(rows[0].P99, 1) {
		t.Fatalf("rows %+v, want p99 past the last bound", rows)
	}
	if got := bound(rows[0].P99); got != "> max" {
		t.Fatalf("bound %q", got)
	}
}

func TestRenderPrimary(t *testing.T) {
	prev := Sample{At: time.Unix(100, 0), Status: api.Status{Epochs: &api.EpochStatus{EpochRawBytes: 0, EpochWireBytes: 0}}}
	cur := Sample{
		At: time.Unix(102, 0),
		Status: api.Status{
			Role: "primary", State: "running",
			GuestInfo: api.GuestInfo{Kind: "kvm", Memory: "1GiB", VCPUs: 2, Workload: "kv"},
			Epochs: &api.EpochStatus{Protection: "protected", Secondary: "b", EpochsPerSecond: 39.5, PauseP50Ms: 0.4, PauseP99Ms: 1.9,
				EpochRawBytes: 4 << 20, EpochWireBytes: 1 << 20, WireRatio: 0.25,
				EpochTrigger: "output", EpochBound: "pause-fraction", EpochsByOutput: 7, EpochsByClock: 3,
				PausedMsPerSecond: 61.5, HeldMsPerSecond: 12.4, MaxPauseFraction: 0.1},
		},
		Metrics: parse(t, hist("tandem_phase_seconds", `phase="flush"`, 3, 3, 3)),
		Slow: []api.SlowEvent{
			{Name: "old", Millis: 120},
			{Name: "vcpu-exit io disk.submit (vcpu 0)", Millis: 412.5, Start: time.Unix(101, 0)},
		},
	}
	var b bytes.Buffer
	Render(&b, "10.0.0.1:7070", prev, cur, 1)
	out := b.String()
	for _, want := range []string{
		"role primary  state running",
		"guest kvm, 1GiB, 2 vCPU, workload kv",
		"protection protected  secondary b",
		"epochs/s 39.5  pause p50 0.40 ms  p99 1.90 ms",
		"trigger output  bound pause-fraction  by output 7  by clock 3  paused 61.5 ms/s  held 12.4 ms/s (fraction 10%)",
		"dirty 2.0 MiB/s  wire 0.5 MiB/s",
		"highest p99 over the last 2.0 s",
		"flush",
		"slow events (latest 1 of 2)",
		"vcpu-exit io disk.submit (vcpu 0)",
		"412.5 ms",
	} {
		if !strings.Contains(out, want) {
			t.Errorf("view lacks %q:\n%s", want, out)
		}
	}
	if strings.Contains(out, "migration") {
		t.Errorf("view shows a migration on a node that never migrated:\n%s", out)
	}
	if strings.Contains(out, "old") {
		t.Errorf("view shows more slow events than asked:\n%s", out)
	}
}
