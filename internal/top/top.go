package top

import (
	"fmt"
	"io"
	"math"
	"sort"
	"strings"
	"time"

	dto "github.com/prometheus/client_model/go"
	"github.com/tandemvm/tandem/api"
)

// Sample is what one look at a node gathers.
type Sample struct {
	At      time.Time
	Status  api.Status
	Metrics map[string]*dto.MetricFamily
	Slow    []api.SlowEvent
}

// timedFamilies are the histograms whose series the view ranks, and the
// labels that name a series.
var timedFamilies = []struct {
	family string
	labels []string
}{
	{"tandem_phase_seconds", []string{"phase"}},
	{"tandem_vcpu_exit_seconds", []string{"reason", "handler"}},
	{"tandem_device_seconds", []string{"device", "op"}},
}

// Row is one timed series over the interval.
type Row struct {
	Name  string
	Count uint64
	P50   float64 // seconds: the upper bound of the bucket holding it
	P99   float64
}

// Rank returns the timed series that ran between prev and cur, highest
// p99 first (then most frequent). A series absent from prev counts from
// zero; one whose count went down (the node restarted) from cur alone.
func Rank(prev, cur Sample) []Row {
	var rows []Row
	for _, tf := range timedFamilies {
		fam := cur.Metrics[tf.family]
		if fam == nil {
			continue
		}
		before := map[string]*dto.Histogram{}
		if pf := prev.Metrics[tf.family]; pf != nil {
			for _, m := range pf.GetMetric() {
				before[seriesName(m, tf.labels)] = m.GetHistogram()
			}
		}
		for _, m := range fam.GetMetric() {
			name := seriesName(m, tf.labels)
			if r, ok := delta(name, before[name], m.GetHistogram()); ok {
				rows = append(rows, r)
			}
		}
	}
	sort.SliceStable(rows, func(i, j int) bool {
		if rows[i].P99 != rows[j].P99 {
			return rows[i].P99 > rows[j].P99
		}
		return rows[i].Count > rows[j].Count
	})
	return rows
}

func seriesName(m *dto.Metric, labels []string) string {
	vals := make([]string, 0, len(labels))
	for _, want := range labels {
		for _, lp := range m.GetLabel() {
			if lp.GetName() == want && lp.GetValue() != "" {
				vals = append(vals, lp.GetValue())
			}
		}
	}
	return strings.Join(vals, " ")
}

// delta is the histogram cur minus prev as a Row; ok is false when
// nothing was observed in between.
func delta(name string, prev, cur *dto.Histogram) (Row, bool) {
	if cur == nil {
		return Row{}, false
	}
	base := map[float64]uint64{}
	var baseCount uint64
	if prev != nil && prev.GetSampleCount() <= cur.GetSampleCount() {
		baseCount = prev.GetSampleCount()
		for _, b := range prev.GetBucket() {
			base[b.GetUpperBound()] = b.GetCumulativeCount()
		}
	}
	n := cur.GetSampleCount() - baseCount
	if n == 0 {
		return Row{}, false
	}
	type bucket struct {
		le  float64
		cum uint64
	}
	var bs []bucket
	for _, b := range cur.GetBucket() {
		c := b.GetCumulativeCount()
		if p := base[b.GetUpperBound()]; p <= c {
			c -= p
		}
		bs = append(bs, bucket{b.GetUpperBound(), c})
	}
	sort.Slice(bs, func(i, j int) bool { return bs[i].le < bs[j].le })
	q := func(q float64) float64 {
		rank := uint64(math.Ceil(q * float64(n)))
		for _, b := range bs {
			if b.cum >= rank {
				return b.le
			}
		}
		return math.Inf(1)
	}
	return Row{Name: name, Count: n, P50: q(0.5), P99: q(0.99)}, true
}

// Render writes the view of the interval from prev to cur (prev may be
// the zero Sample: figures then cover the node's whole life). rows caps
// the ranked table and the slow list.
func Render(w io.Writer, addr string, prev, cur Sample, rows int) {
	st := cur.Status
	fmt.Fprintf(w, "tandem top  %s  %s\n", addr, cur.At.UTC().Format("2006-01-02 15:04:05Z"))
	fmt.Fprintf(w, "role %s  state %s", orDash(st.Role), orDash(st.State))
	if st.StateReason != "" {
		fmt.Fprintf(w, " (%s)", st.StateReason)
	}
	fmt.Fprintln(w)
	if st.Kind != "" {
		fmt.Fprintf(w, "guest %s, %s, %d vCPU, workload %s\n", st.Kind, st.Memory, st.VCPUs, st.Workload)
	}
	if c := st.Cluster; c != nil {
		fmt.Fprintf(w, "cluster %s  generation %d  primary %s  leader %s  epoch %d  protected %v\n",
			c.ID, c.Generation, orDash(c.Primary), orDash(c.Leader), c.Epoch, c.Protected)
	}
	dt := cur.At.Sub(prev.At).Seconds()
	if e := st.Epochs; e != nil {
		prot := e.Protection
		if e.ProtectionReason != "" {
			prot += " (" + e.ProtectionReason + ")"
		}
		fmt.Fprintf(w, "protection %s  secondary %s  committed %d  lag %d\n", prot, orDash(e.Secondary), e.LastCommittedEpoch, e.SecondaryLag)
		fmt.Fprintf(w, "epochs/s %.1f  pause p50 %.2f ms  p99 %.2f ms  output delay p50 %.1f ms  p99 %.1f ms  ack p99 %.1f ms\n",
			e.EpochsPerSecond, e.PauseP50Ms, e.PauseP99Ms, e.OutputDelayP50Ms, e.OutputDelayP99Ms, e.AckLatencyP99Ms)
		if e.EpochTrigger == "output" {
			// Which bound set the last epoch's end, and the pauses' share
			// of the guest's time (held: what the fraction bounds).
			fmt.Fprintf(w, "trigger output  bound %s  by output %d  by clock %d  paused %.1f ms/s  held %.1f ms/s (fraction %.0f%%)\n",
				orDash(e.EpochBound), e.EpochsByOutput, e.EpochsByClock, e.PausedMsPerSecond, e.HeldMsPerSecond, 100*e.MaxPauseFraction)
		}
		if pe := prev.Status.Epochs; pe != nil && dt > 0 && e.EpochRawBytes >= pe.EpochRawBytes {
			fmt.Fprintf(w, "dirty %.1f MiB/s  wire %.1f MiB/s  wire/raw %.3f  held output %d B\n",
				float64(e.EpochRawBytes-pe.EpochRawBytes)/dt/(1<<20), float64(e.EpochWireBytes-pe.EpochWireBytes)/dt/(1<<20),
				e.WireRatio, e.OutputHeldBytes)
		}
	}
	if s := st.Secondary; s != nil {
		fmt.Fprintf(w, "secondary of %s  committed %d  consistent %v  last commit %d ms ago\n",
			orDash(s.Primary), s.LastCommittedEpoch, s.Consistent, s.LastCommitAgoMs)
	}
	if m := st.MigrationStatus; migrationStates[m.Status] {
		fmt.Fprintf(w, "migration %s  round %d  remaining %.1f MiB  dirty %d pages/s  %.0f Mbit/s  throttle %d%%  expected downtime %d ms\n",
			m.Status, m.Round, float64(m.RemainingBytes)/(1<<20), m.DirtyPagesRate, m.Mbps, m.ThrottlePercent, m.ExpectedDowntimeMs)
	}
	ranked := Rank(prev, cur)
	what := "since start"
	if !prev.At.IsZero() {
		what = fmt.Sprintf("over the last %.1f s", dt)
	}
	fmt.Fprintf(w, "\nhighest p99 %s\n%-44s %9s %10s %10s\n", what, "phase / handler", "count", "p50", "p99")
	for i, r := range ranked {
		if i == rows {
			break
		}
		fmt.Fprintf(w, "%-44s %9d %10s %10s\n", clip(r.Name, 44), r.Count, bound(r.P50), bound(r.P99))
	}
	if len(ranked) == 0 {
		fmt.Fprintln(w, "(nothing timed in this interval)")
	}
	fmt.Fprintf(w, "\nslow events (latest %d of %d)\n", min(rows, len(cur.Slow)), len(cur.Slow))
	for i := max(0, len(cur.Slow)-rows); i < len(cur.Slow); i++ {
		s := cur.Slow[i]
		fmt.Fprintf(w, "%s  %-44s %10.1f ms\n", s.Start.UTC().Format("15:04:05.000"), clip(s.Name, 44), s.Millis)
	}
}

// migrationStates are the statuses of a migration (a node that never
// migrated reports its own state there).
var migrationStates = map[string]bool{"setup": true, "active": true, "device": true, "completed": true, "failed": true, "unknown": true}

// bound prints a bucket's upper bound as "<= X".
func bound(s float64) string {
	if math.IsInf(s, 1) {
		return "> max"
	}
	return "<=" + time.Duration(s*float64(time.Second)).String()
}

func orDash(s string) string {
	if s == "" {
		return "-"
	}
	return s
}

func clip(s string, n int) string {
	if len(s) <= n {
		return s
	}
	return s[:n-1] + "…"
}
