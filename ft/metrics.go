package ft

import (
	"sync"
	"sync/atomic"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/tandemvm/tandem/failover"
)

// metricSource is what a role's metrics read at scrape time. Every
// function may be nil (the figure is then 0).
type metricSource struct {
	// role is the node's part now: primary, secondary, witness, run,
	// receive.
	role func() string
	// cluster is the raft record and the voters this node reaches (ok
	// false: no raft here).
	cluster func() (st failover.FSMState, reachable int, ok bool)
	// loop is the epoch loop protecting this node's guest (nil: none).
	loop func() *failover.EpochLoop
	// fences counts the times this node's guest was fenced.
	fences *atomic.Uint64
}

// roleMetrics exports the figures an operator alerts on, the same names
// on every role (the witness included), so one rule covers the trio:
//
//	tandem_role{role}                 1 for the node's current part
//	tandem_protected                  1 while the guest is protected
//	tandem_generation                 the cluster's fencing generation
//	tandem_secondary_lag_epochs       epochs shipped, not yet acknowledged
//	tandem_quorum_voters_reachable    voters this node knows it reaches
//	tandem_failovers_total            promotions seen since this process started
//	tandem_fences_total               times this node's guest was fenced
//	tandem_epochs_total               epochs this node shipped as primary
//	tandem_digest_mismatches_total    replica digest mismatches found here
//	tandem_epoch_throttle_percent     share of time a primary keeps its guest's vCPUs from running because its dirty bytes outrun the link
//
// Counters never go backwards: a new epoch loop (after a promotion)
// starts its own figures at 0, so each loop's are added to what the
// earlier ones counted.
type roleMetrics struct {
	src metricSource

	mu       sync.Mutex
	firstGen uint64
	seenGen  bool
	roles    map[string]bool // every role ever reported (each gets a series)
	loop     *failover.EpochLoop
	epochs   accumulator
	mismatch accumulator
}

// accumulator turns per-loop counts into one process-wide counter.
type accumulator struct{ base, last uint64 }

func (a *accumulator) total(newLoop bool, cur uint64, have bool) uint64 {
	if newLoop {
		a.base += a.last
		a.last = 0
	}
	if have {
		a.last = cur
	}
	return a.base + a.last
}

func registerRoleMetrics(reg prometheus.Registerer, src metricSource) *roleMetrics {
	rm := &roleMetrics{src: src, roles: map[string]bool{}}
	reg.MustRegister(rm)
	return rm
}

var (
	descRole      = prometheus.NewDesc("tandem_role", "1 for the part this node plays now (label role: primary, secondary, witness, run, receive, fenced nodes keep theirs), 0 for parts it played before", []string{"role"}, nil)
	descProtected = prometheus.NewDesc("tandem_protected", "1 while the guest is protected: on a primary, its secondary holds a replica whose last epoch was acknowledged (and verified, with --verify-epochs); on a secondary or the witness, raft's record of it", nil, nil)
	descGen       = prometheus.NewDesc("tandem_generation", "the cluster's generation (fencing token) as this node knows it; 0 without raft", nil, nil)
	descLag       = prometheus.NewDesc("tandem_secondary_lag_epochs", "on a primary, epochs shipped to the secondary and not yet acknowledged; 0 elsewhere", nil, nil)
	descReach     = prometheus.NewDesc("tandem_quorum_voters_reachable", "raft voters this node knows it reaches, itself included (the leader sees every voter; a follower only itself and the leader, so 2 is its most); 0 without raft. Below 2: the cluster cannot decide, and one more failure stops the guest at 2", nil, nil)
	descFailovers = prometheus.NewDesc("tandem_failovers_total", "promotions (failovers and switchovers) this node has seen since it started: the growth of the generation", nil, nil)
	descFences    = prometheus.NewDesc("tandem_fences_total", "times this node's guest was fenced (stopped because another node is, or may be, primary)", nil, nil)
	descEpochs    = prometheus.NewDesc("tandem_epochs_total", "epochs this node captured and shipped as primary", nil, nil)
	descThrottle  = prometheus.NewDesc("tandem_epoch_throttle_percent", "on a primary, the share of time (per cent) its epoch loop keeps the guest's vCPUs from running because the guest dirties memory faster than the link to the secondary carries it (epochs stretched); 0 elsewhere", nil, nil)
	descMismatch  = prometheus.NewDesc("tandem_digest_mismatches_total", "replica digest mismatches this node found as primary (each one ends protection and re-syncs the secondary)", nil, nil)
)

// Describe implements prometheus.Collector.
func (rm *roleMetrics) Describe(ch chan<- *prometheus.Desc) {
	for _, d := range []*prometheus.Desc{descRole, descProtected, descGen, descLag, descReach, descFailovers, descFences, descEpochs, descMismatch, descThrottle} {
		ch <- d
	}
}

// Collect implements prometheus.Collector.
func (rm *roleMetrics) Collect(ch chan<- prometheus.Metric) {
	role := ""
	if rm.src.role != nil {
		role = rm.src.role()
	}
	var st failover.FSMState
	var reach int
	var haveRaft bool
	if rm.src.cluster != nil {
		st, reach, haveRaft = rm.src.cluster()
	}
	var loop *failover.EpochLoop
	if rm.src.loop != nil {
		loop = rm.src.loop()
	}
	var es failover.EpochStatus
	if loop != nil {
		es = loop.Status()
	}
	protected := haveRaft && st.Protected
	if loop != nil {
		protected = es.Protected
	}
	var fences uint64
	if rm.src.fences != nil {
		fences = rm.src.fences.Load()
	}

	rm.mu.Lock()
	if role != "" {
		rm.roles[role] = true
	}
	roles := make(map[string]bool, len(rm.roles))
	for r := range rm.roles {
		roles[r] = r == role
	}
	if haveRaft && !rm.seenGen {
		rm.firstGen, rm.seenGen = st.Generation, true
	}
	failovers := uint64(0)
	if haveRaft && st.Generation > rm.firstGen {
		failovers = st.Generation - rm.firstGen
	}
	newLoop := loop != nil && loop != rm.loop
	if newLoop {
		rm.loop = loop
	}
	epochs := rm.epochs.total(newLoop, es.Epochs, loop != nil)
	mismatches := rm.mismatch.total(newLoop, es.DigestMismatches, loop != nil)
	rm.mu.Unlock()

	for r, now := range roles {
		ch <- prometheus.MustNewConstMetric(descRole, prometheus.GaugeValue, b2f(now), r)
	}
	ch <- prometheus.MustNewConstMetric(descProtected, prometheus.GaugeValue, b2f(protected))
	ch <- prometheus.MustNewConstMetric(descGen, prometheus.GaugeValue, float64(st.Generation))
	ch <- prometheus.MustNewConstMetric(descLag, prometheus.GaugeValue, float64(es.SecondaryLag))
	ch <- prometheus.MustNewConstMetric(descReach, prometheus.GaugeValue, float64(reach))
	ch <- prometheus.MustNewConstMetric(descFailovers, prometheus.CounterValue, float64(failovers))
	ch <- prometheus.MustNewConstMetric(descFences, prometheus.CounterValue, float64(fences))
	ch <- prometheus.MustNewConstMetric(descEpochs, prometheus.CounterValue, float64(epochs))
	ch <- prometheus.MustNewConstMetric(descMismatch, prometheus.CounterValue, float64(mismatches))
	ch <- prometheus.MustNewConstMetric(descThrottle, prometheus.GaugeValue, float64(es.ThrottlePercent))
}

func b2f(b bool) float64 {
	if b {
		return 1
	}
	return 0
}
