package postcopy

import (
	"bytes"
	"context"
	"errors"
	"math/rand/v2"
	"net"
	"sync"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/tandemvm/tandem/guest"
	"github.com/tandemvm/tandem/internal/uffd"
	"github.com/tandemvm/tandem/precopy"
)

func mapRegion(t *testing.T, gpa uint64, pages int) guest.Region {
	t.Helper()
	mem, err := unix.Mmap(-1, 0, pages*guest.PageSize, unix.PROT_READ|unix.PROT_WRITE, unix.MAP_PRIVATE|unix.MAP_ANONYMOUS|unix.MAP_NORESERVE)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { unix.Munmap(mem) })
	return guest.Region{GPA: gpa, Mem: mem}
}

// scene is a source and destination after precopy: the destination holds
// every page except the missing ones, which hold stale bytes.
type scene struct {
	src, dst []guest.Region
	missing  *precopy.Bitmap
	state    guest.MachineState
	digest   guest.Digest
}

// newScene builds two regions with a gap between them (as a KVM guest's
// slots), fills some pages with random bytes, leaves others zero and
// marks a share missing.
func newScene(t *testing.T, pages int, seed uint64) *scene {
	rng := rand.New(rand.NewPCG(seed, 1))
	s := &scene{state: guest.MachineState{Kind: "test", Devices: []guest.DeviceState{{Name: "cpu", Fields: []byte{1, 2, 3}}}}}
	gpas := []uint64{0, uint64(pages) * 2 * guest.PageSize}
	for _, gpa := range gpas {
		s.src = append(s.src, mapRegion(t, gpa, pages))
		s.dst = append(s.dst, mapRegion(t, gpa, pages))
	}
	pm := newPageMap(s.src)
	s.missing = precopy.NewBitmap(pm.limit)
	for i, r := range s.src {
		for p := range pages {
			pg := r.Mem[p*guest.PageSize : (p+1)*guest.PageSize]
			if rng.IntN(4) != 0 { // a quarter stays zero (never touched)
				for j := 0; j < guest.PageSize; j += 8 {
					pg[j] = byte(rng.Uint32())
				}
			}
			dpg := s.dst[i].Mem[p*guest.PageSize : (p+1)*guest.PageSize]
			if rng.IntN(3) == 0 {
				s.missing.Set(r.FirstPage() + uint64(p))
				dpg[7] = 0xEE // stale: what an earlier round sent
			} else if !guest.IsZeroPage(pg) {
				copy(dpg, pg)
			}
		}
	}
	s.digest = guest.CombineDigest(guest.ScanMemory(s.src).Sum(), s.state)
	return s
}

// tcpPair is a connected loopback TCP pair.
func tcpPair(t testing.TB) (net.Conn, net.Conn) {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	acc := make(chan net.Conn, 1)
	go func() {
		c, _ := ln.Accept()
		acc <- c
	}()
	c, err := net.Dial("tcp", ln.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	s := <-acc
	if s == nil {
		t.Fatal("accept failed")
	}
	t.Cleanup(func() { c.Close(); s.Close() })
	return c, s
}

// links are the two connections as each side sees them.
type links struct{ srcUrgent, srcBulk, dstUrgent, dstBulk net.Conn }

func newLinks(t *testing.T) links { return newLinksTB(t) }

func newLinksTB(t testing.TB) links {
	a, b := tcpPair(t)
	c, d := tcpPair(t)
	return links{srcUrgent: a, dstUrgent: b, srcBulk: c, dstBulk: d}
}

func newTarget(t *testing.T, s *scene, retry time.Duration) *Target {
	t.Helper()
	tg, err := NewTarget(TargetConfig{Regions: s.dst, Missing: s.missing, State: s.state, RetryAfter: retry})
	if errors.Is(err, uffd.ErrUnavailable) {
		t.Skipf("userfaultfd unavailable: %v", err)
	}
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(tg.Close)
	return tg
}

// reader is a "vCPU": it reads pages in random order and records any
// that differ from the source.
func reader(s *scene, seed uint64, n int, wrong *[]uint64, mu *sync.Mutex) {
	rng := rand.New(rand.NewPCG(seed, 2))
	for range n {
		i := rng.IntN(len(s.dst))
		p := rng.IntN(int(s.dst[i].Pages()))
		got := s.dst[i].Mem[p*guest.PageSize : (p+1)*guest.PageSize]
		// Fault in a system call, as the synth guest's vCPUs do: a
		// fault in a plain load can hold a P the server needs.
		if err := uffd.Populate(got); err != nil {
			panic(err)
		}
		want := s.src[i].Mem[p*guest.PageSize : (p+1)*guest.PageSize]
		if !bytes.Equal(got, want) {
			mu.Lock()
			*wrong = append(*wrong, s.dst[i].FirstPage()+uint64(p))
			mu.Unlock()
		}
	}
}

// runBoth runs both halves over l and returns their errors.
func runBoth(ctx context.Context, src *Source, tg *Target, l links) (srcErr, dstErr error) {
	var wg sync.WaitGroup
	wg.Go(func() { srcErr = src.Run(ctx, l.srcUrgent, l.srcBulk) })
	wg.Go(func() { dstErr = tg.Run(ctx, l.dstUrgent, l.dstBulk) })
	wg.Wait()
	return
}

func sameMemory(t *testing.T, s *scene) {
	t.Helper()
	for i := range s.src {
		if !bytes.Equal(s.src[i].Mem, s.dst[i].Mem) {
			t.Fatalf("region %d differs after post-copy", i)
		}
	}
}

// Readers on the destination fault on missing pages and see the source's
// content; every page arrives; the digests agree.
func TestPostcopyMovesEveryPage(t *testing.T) {
	s := newScene(t, 2048, 1)
	owed := s.missing.Count()
	tg := newTarget(t, s, 0)
	src := NewSource(s.src, s.digest)
	var wrong []uint64
	var mu sync.Mutex
	var readers sync.WaitGroup
	for v := range 2 {
		readers.Go(func() { reader(s, uint64(v), 500, &wrong, &mu) })
	}
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	srcErr, dstErr := runBoth(ctx, src, tg, newLinks(t))
	readers.Wait()
	if srcErr != nil || dstErr != nil {
		t.Fatalf("source: %v; destination: %v", srcErr, dstErr)
	}
	if len(wrong) > 0 {
		t.Fatalf("%d reads saw other content than the source's, first page %d", len(wrong), wrong[0])
	}
	sameMemory(t, s)
	st, ss := tg.Stats(), src.Stats()
	if st.Active || st.Remaining != 0 || st.Received != owed || st.Digest != s.digest.String() {
		t.Fatalf("target stats %+v, want %d received and digest %s", st, owed, s.digest)
	}
	if ss.Requests+ss.Pushed < owed || ss.Runs != 1 {
		t.Fatalf("source stats %+v, owed %d", ss, owed)
	}
	t.Logf("owed %d pages: %d faults, %d requests served, %d pushed, blocked %v", owed, st.Faults, ss.Requests, ss.Pushed, st.Blocktime)
}
