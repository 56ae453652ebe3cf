package test

import (
	"bufio"
	"cmp"
	"context"
	"crypto/tls"
	"fmt"
	"io"
	"maps"
	"math"
	"math/rand/v2"
	"net/http"
	"slices"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/tandemvm/tandem/api"
	"github.com/tandemvm/tandem/internal/e2e"
)

// Helpers of the micro-checkpointing (FT) tests: a primary/secondary pair
// of real processes, their protection figures, and kv clients that keep
// a record of what they were told. The process, port and console
// machinery is the migration harness's (harness_test.go).

// ftStatus is the protection view of a primary's or a secondary's
// status, decoded by api.Client: a primary's epoch-loop figures
// (api.EpochStatus) and the secondary's the tests read, with the two
// both have taken from whichever the node has.
type ftStatus struct {
	Role, State        string
	Protected          bool
	LastCommittedEpoch uint64
	api.EpochStatus
	// The secondary's figures (api.SecondaryStatus).
	Consistent, Syncing, Activated  bool
	Commits                         uint64
	CommittedDigest, ImageGuestKind string
	LastError                       string
	// PageWrites is the guest's own count of its dirtying page writes.
	PageWrites uint64
}

func getFT(addr string, digest bool) (ftStatus, error) {
	st, err := nodeAPI(addr).Status(context.Background(), digest)
	if err != nil {
		return ftStatus{}, withCode("GET", "/status", err)
	}
	out := ftStatus{Role: st.Role, State: st.State, Protected: st.Protected(), LastCommittedEpoch: st.LastCommittedEpoch(),
		PageWrites: st.PageWrites}
	if st.Epochs != nil {
		out.EpochStatus = *st.Epochs
	}
	if st.Secondary != nil {
		sec := st.Secondary
		out.Consistent, out.Syncing, out.Activated, out.Commits = sec.Consistent, sec.Syncing, sec.Activated, sec.Commits
		out.CommittedDigest, out.ImageGuestKind, out.LastError = sec.Digest, sec.GuestKind, sec.LastError
	}
	return out, nil
}

func mustFT(t testing.TB, n *node, digest bool) ftStatus {
	t.Helper()
	st, err := getFT(n.api, digest)
	if err != nil {
		t.Fatalf("%s status: %v", n.name, err)
	}
	return st
}

// waitFT polls n's protection figures until ok says so or the deadline
// passes.
func waitFT(t testing.TB, n *node, timeout time.Duration, what string, ok func(ftStatus) bool) ftStatus {
	t.Helper()
	deadline := time.Now().Add(timeout)
	for {
		st, err := getFT(n.api, false)
		if err == nil && ok(st) {
			return st
		}
		if time.Now().After(deadline) {
			t.Fatalf("%s: not %s after %v (last status %+v, err %v)", n.name, what, timeout, st, err)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// secAddrs are a secondary's three addresses, kept so it can be restarted
// where its primary expects it.
type secAddrs struct{ data, api, console string }

func newSecAddrs(t testing.TB) secAddrs {
	return secAddrs{data: freeAddr(t), api: freeAddr(t), console: freeAddr(t)}
}

// startSecondary starts `tandem secondary` on a's addresses.
func startSecondary(t testing.TB, name string, a secAddrs, extra ...string) *node {
	t.Helper()
	args := append([]string{"secondary", "--data", a.data, "--api", a.api, "--console", a.console}, extra...)
	n := startProc(t, name, args...)
	n.api, n.console, n.data = a.api, a.console, a.data
	if err := n.waitReady(20 * time.Second); err != nil {
		t.Fatalf("start %s: %v\n%s", name, err, n.log())
	}
	return n
}

// primaryOpts are the flags of a `tandem primary`.
type primaryOpts struct {
	memory, touch string
	workload      string // kv (default) or dirty
	dirtyRate     int
	epoch         string
	verify        bool
	noVerify      bool // --verify-epochs=false (verification is on by default)
	extra         []string
	// pki runs the pair with TLS: the primary's certificate is cert
	// (default "a"), the secondary's "b"; secName is the primary's
	// --secondary-name (startPair: default "b").
	pki           *testPKI
	cert, secName string
	// protectWait bounds startPair's wait for protection; 0 means 60 s.
	protectWait time.Duration
}

func (o primaryOpts) args(kind, secondary string) []string {
	a := []string{"primary", "--guest", kind, "--memory", orStr(o.memory, "256MiB"),
		"--workload", orStr(o.workload, "kv"), "--secondary", secondary}
	if o.workload == "dirty" {
		a = append(a, "--touch", o.touch, "--dirty-rate", fmt.Sprint(o.dirtyRate), "--dirty-pattern", "random")
	}
	if o.epoch != "" {
		a = append(a, "--epoch", o.epoch)
	}
	if o.verify {
		a = append(a, "--verify-epochs")
	}
	if o.noVerify {
		a = append(a, "--verify-epochs=false")
	}
	if o.pki != nil {
		a = append(a, o.pki.nodeArgs(orStr(o.cert, "a"))...)
		if o.secName != "" {
			a = append(a, "--secondary-name", o.secName)
		}
	}
	return append(a, o.extra...)
}

// startPrimary starts `tandem primary` protected by the secondary at
// secData, on fresh API and console addresses.
func startPrimary(t testing.TB, name, kind, secData string, o primaryOpts) *node {
	t.Helper()
	var client *tls.Config
	if o.pki != nil {
		client = o.pki.client(operator)
	}
	return startOnFreshPorts(t, name, false, client, o.args(kind, secData)...)
}

// startPair starts a secondary and a primary protected by it and waits
// until the primary reports protection.
func startPair(t testing.TB, kind string, o primaryOpts, secExtra ...string) (pri, sec *node, sa secAddrs) {
	t.Helper()
	sa = newSecAddrs(t)
	if o.pki != nil {
		useTLS(o.pki.client(operator), sa.api, sa.console)
		secExtra = append(append(o.pki.nodeArgs("b"), "--primary-name", orStr(o.cert, "a")), secExtra...)
		o.secName = orStr(o.secName, "b")
	}
	sec = startSecondary(t, "secondary-"+kind, sa, secExtra...)
	pri = startPrimary(t, "primary-"+kind, kind, sa.data, o)
	waitFT(t, pri, cmp.Or(o.protectWait, 60*time.Second), "protected", func(s ftStatus) bool { return s.Protection == "protected" })
	return pri, sec, sa
}

// activate runs `tandem activate` against a secondary and fails the test
// unless it took over.
func activate(t testing.TB, sec *node) {
	t.Helper()
	r := runCLI(t, 30*time.Second, "activate", "--api", sec.api)
	if r.code != 0 {
		t.Fatalf("tandem activate: exit %d\nstdout:\n%s\nstderr:\n%s", r.code, r.stdout, r.stderr)
	}
	st := mustFT(t, sec, false)
	if st.Role != "primary" || st.State != "running" {
		t.Fatalf("after activate: role %q state %q, want a running primary", st.Role, st.State)
	}
}

// dialConsoleErr is dialConsole without the test: it may run on any
// goroutine and returns the error instead.
func dialConsoleErr(n *node, id string) (*console, error) {
	c, err := dialAddr(n.console, 3*time.Second)
	if err != nil {
		return nil, fmt.Errorf("console of %s: %w", n.name, err)
	}
	return &console{c: c, r: bufio.NewReader(c), id: id, name: n.name}, nil
}

// ackLog is what kv clients were told: for each key, the value a write's
// acknowledgement confirmed, and every GET reply with the value it showed.
type ackLog struct {
	mu      sync.Mutex
	acked   map[string]string // key -> value, from an acknowledged SET
	sent    map[string]string // key -> value of every SET sent (acked or not)
	gets    []getSeen
	replies int
	// hist is every request of the writers and of the checks that read
	// their keys back (e2e.History), checked for linearizability by
	// checkAcked.
	hist *e2e.History
}

type getSeen struct{ key, reply string }

func newAckLog() *ackLog {
	return &ackLog{acked: map[string]string{}, sent: map[string]string{}, hist: e2e.NewHistory()}
}

// kvWriter writes k-<id>-<i> = v<i>-<rand> with increasing seq, each key
// once, waiting for every reply (deadline timeout), and every fourth
// request reads back an earlier acknowledged key. It stops at the first
// error (the primary is gone) or when stop closes, and returns the error
// with the request it was waiting for.
func kvWriter(c *console, log *ackLog, stop <-chan struct{}, timeout time.Duration, rng *rand.Rand) error {
	c.hist = log.hist
	var mine []string
	for i := 1; ; i++ {
		select {
		case <-stop:
			return nil
		default:
		}
		if i%4 == 0 && len(mine) > 0 {
			k := mine[rng.IntN(len(mine))]
			c.seq++
			r, err := c.requestSeq(c.seq, "GET "+k, timeout)
			if err != nil {
				return err
			}
			log.mu.Lock()
			log.gets = append(log.gets, getSeen{k, r})
			log.replies++
			log.mu.Unlock()
			continue
		}
		k := fmt.Sprintf("k-%s-%d", c.id, i)
		v := fmt.Sprintf("v%d-%d", i, rng.Uint32())
		log.mu.Lock()
		log.sent[k] = v
		log.mu.Unlock()
		c.seq++
		r, err := c.requestSeq(c.seq, "SET "+k+" "+v, timeout)
		if err != nil {
			return err
		}
		if r != "OK" {
			return fmt.Errorf("SET %s: reply %q, want OK", k, r)
		}
		log.mu.Lock()
		log.acked[k] = v
		log.replies++
		log.mu.Unlock()
		mine = append(mine, k)
	}
}

// checkAcked proves on n's console that every acknowledged write is there
// with its value, that every GET reply a client saw agrees with n's state,
// and that no key that was never sent exists.
func checkAcked(t testing.TB, n *node, log *ackLog) {
	t.Helper()
	checkAckedAs(t, n, log, "verify")
}

// checkAckedAs is checkAcked with its own kv client ID: a guest answers a
// client's seq that is not above its last one from its record of that
// last reply, so a second check of the same guest needs a new ID.
func checkAckedAs(t testing.TB, n *node, log *ackLog, client string) {
	t.Helper()
	c, err := dialConsoleErr(n, client)
	if err != nil {
		t.Fatal(err)
	}
	defer c.c.Close()
	c.hist = log.hist
	get := func(k string) string {
		c.seq++
		r, err := c.requestSeq(c.seq, "GET "+k, 10*time.Second)
		if err != nil {
			t.Fatal(err)
		}
		return r
	}
	log.mu.Lock()
	defer log.mu.Unlock()
	for k, v := range log.acked {
		if r := get(k); r != "OK "+v {
			t.Errorf("acknowledged write %s=%s lost: the activated guest answers GET %s with %q", k, v, k, r)
		}
	}
	for _, g := range log.gets {
		// Keys are written once, so what a GET showed must still hold.
		if r := get(g.key); r != g.reply {
			t.Errorf("a client saw GET %s = %q, the activated guest says %q", g.key, g.reply, r)
		}
	}
	for k, v := range log.sent {
		if _, ok := log.acked[k]; ok {
			continue
		}
		// Sent but not acknowledged: either outcome is allowed, but only
		// with the value sent.
		if r := get(k); r != "NOTFOUND" && r != "OK "+v {
			t.Errorf("unacknowledged write %s=%s: the activated guest answers %q", k, v, r)
		}
	}
	if r := get("never-written"); r != "NOTFOUND" {
		t.Errorf("GET of a key never written: %q", r)
	}
	checkLinearizable(t, log.hist)
}

// checkLinearizable fails the test if h is shown not linearizable; a
// check that runs out of time is logged as unknown.
func checkLinearizable(t testing.TB, h *e2e.History) {
	t.Helper()
	r := h.Check(30 * time.Second)
	if r.Verdict == e2e.NotLinearizable {
		t.Errorf("kv history not linearizable: %s", r)
		return
	}
	t.Logf("kv history: %s", r)
}

// metricSums reads the tandem_phase_seconds histogram of n's /metrics:
// per phase, the sum of seconds and the count.
func metricSums(api string) (map[string][2]float64, error) {
	base, hc := apiClient(api)
	resp, err := hc.Get(base + "/metrics")
	if err != nil {
		return nil, err
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return nil, fmt.Errorf("GET /metrics: %s", resp.Status)
	}
	b, err := io.ReadAll(io.LimitReader(resp.Body, 8<<20))
	if err != nil {
		return nil, err
	}
	out := map[string][2]float64{}
	for _, line := range strings.Split(string(b), "\n") {
		var idx int
		switch {
		case strings.HasPrefix(line, "tandem_phase_seconds_sum{"):
			idx = 0
		case strings.HasPrefix(line, "tandem_phase_seconds_count{"):
			idx = 1
		default:
			continue
		}
		i := strings.Index(line, `phase="`)
		if i < 0 {
			continue
		}
		rest := line[i+len(`phase="`):]
		j := strings.IndexByte(rest, '"')
		sp := strings.LastIndexByte(line, ' ')
		if j < 0 || sp < 0 {
			continue
		}
		v, err := strconv.ParseFloat(line[sp+1:], 64)
		if err != nil {
			continue
		}
		e := out[rest[:j]]
		e[idx] = v
		out[rest[:j]] = e
	}
	return out, nil
}

// outputDelayBuckets reads the cumulative buckets of n's console output
// delay histogram (tandem_output_delay_seconds{kind="console"}): count
// of releases at or under each bound in seconds (+Inf as math.Inf(1)).
func outputDelayBuckets(api string) (map[float64]float64, error) {
	return histBuckets(api, `tandem_output_delay_seconds_bucket{kind="console",le="`)
}

// phaseBuckets reads the cumulative buckets of n's phase histogram
// tandem_phase_seconds{phase=...}, as outputDelayBuckets.
func phaseBuckets(api, phase string) (map[float64]float64, error) {
	return histBuckets(api, `tandem_phase_seconds_bucket{phase="`+phase+`",le="`)
}

// histBuckets reads the buckets of the histogram series whose bucket
// lines start with prefix (up to the le label's value).
func histBuckets(api, prefix string) (map[float64]float64, error) {
	base, hc := apiClient(api)
	resp, err := hc.Get(base + "/metrics")
	if err != nil {
		return nil, err
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(io.LimitReader(resp.Body, 8<<20))
	if err != nil {
		return nil, err
	}
	out := map[float64]float64{}
	for _, line := range strings.Split(string(b), "\n") {
		rest, ok := strings.CutPrefix(line, prefix)
		if !ok {
			continue
		}
		le, val, ok := strings.Cut(rest, `"} `)
		if !ok {
			continue
		}
		bound, err1 := strconv.ParseFloat(le, 64) // "+Inf" parses as +Inf
		v, err2 := strconv.ParseFloat(val, 64)
		if err1 == nil && err2 == nil {
			out[bound] = v
		}
	}
	return out, nil
}

// delayBound is, over the releases between two readings of
// outputDelayBuckets, the smallest bucket bound in ms that at least
// share q of them were under (an upper bound on the q-quantile), and
// the share at or under each bound; NaN without releases.
func delayBound(before, after map[float64]float64, q float64) (boundMs float64, share map[float64]float64) {
	total := after[math.Inf(1)] - before[math.Inf(1)]
	share = map[float64]float64{}
	bounds := slices.Sorted(maps.Keys(after))
	boundMs = math.NaN()
	for _, le := range bounds {
		if total <= 0 {
			break
		}
		share[le] = (after[le] - before[le]) / total
		if math.IsNaN(boundMs) && share[le] >= q {
			boundMs = le * 1000
		}
	}
	return boundMs, share
}
