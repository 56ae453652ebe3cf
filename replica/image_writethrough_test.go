package replica

import (
	"bytes"
	"errors"
	"io"
	"math/rand/v2"
	"testing"

	"github.com/tandemvm/tandem/checkpoint"
	"github.com/tandemvm/tandem/guest"
	"github.com/tandemvm/tandem/guest/synth"
)

const wtPages = 256

func wtGuest(t *testing.T) *synth.Guest {
	t.Helper()
	g, err := synth.New(guest.Config{Memory: wtPages * guest.PageSize, VCPUs: 1, Workload: guest.Workload{Kind: guest.WorkloadKV}})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { g.Close() })
	return g
}

// wtStream is a stream of four epochs over a wtPages guest: random pages,
// then small rewrites (XOR deltas), pages back to zero and a page
// written twice in one epoch, then the machine state of a synth guest.
func wtStream(t *testing.T) []byte {
	t.Helper()
	src := wtGuest(t)
	mem := make([]byte, wtPages*guest.PageSize)
	rng := rand.New(rand.NewPCG(5, 6))
	for i := 0; i < wtPages/2*guest.PageSize; i++ {
		mem[i] = byte(rng.Uint32())
	}
	pages := func(idx ...int) []checkpoint.Page {
		var ps []checkpoint.Page
		for _, i := range idx {
			ps = append(ps, checkpoint.Page{Index: uint64(i), Data: bytes.Clone(mem[i*guest.PageSize : (i+1)*guest.PageSize])})
		}
		return ps
	}
	var buf bytes.Buffer
	w, err := checkpoint.NewWriter(&buf, checkpoint.Header{Build: "test", Kind: synth.Kind, Regions: checkpoint.RegionsOf(src.Regions())}, checkpoint.Options{})
	if err != nil {
		t.Fatal(err)
	}
	all := make([]int, wtPages)
	for i := range all {
		all[i] = i
	}
	step := func(ps []checkpoint.Page, epoch uint64) {
		if err := w.WritePages(ps); err != nil {
			t.Fatal(err)
		}
		if _, err := w.EndEpoch(epoch); err != nil {
			t.Fatal(err)
		}
	}
	step(pages(all...), 1)
	for i := 0; i < 40; i++ {
		mem[i*3*guest.PageSize+i] ^= 0x5a // a few bytes: sent as XOR deltas
	}
	clear(mem[7*guest.PageSize : 9*guest.PageSize]) // back to zero
	twice := pages(10)
	mem[10*guest.PageSize] ^= 1
	ps := append(pages(0, 3, 6, 7, 8, 9, 30, 60, 90, 117), twice...)
	step(append(ps, pages(10)...), 2)
	st, err := src.SaveState()
	if err != nil {
		t.Fatal(err)
	}
	if err := w.WriteDevices(st); err != nil {
		t.Fatal(err)
	}
	step(pages(200), 3)
	if err := w.EndStream(); err != nil {
		t.Fatal(err)
	}
	return buf.Bytes()
}

func receiveAll(t *testing.T, stream []byte, im *Image) {
	t.Helper()
	rd, err := checkpoint.NewReader(bytes.NewReader(stream), checkpoint.Limits{})
	if err != nil {
		t.Fatal(err)
	}
	for {
		if _, err := rd.ReadEpoch(im); errors.Is(err, io.EOF) {
			return
		} else if err != nil {
			t.Fatal(err)
		}
	}
}

// A write-through image ends with the memory and digest a staged one
// has, and its digest is that of a full scan of its memory.
func TestWriteThroughMatchesStaged(t *testing.T) {
	stream := wtStream(t)
	staged, through := NewImage(wtGuest(t)), NewImage(wtGuest(t))
	through.WriteThrough()
	receiveAll(t, stream, staged)
	receiveAll(t, stream, through)
	if !bytes.Equal(staged.Guest().Regions()[0].Mem, through.Guest().Regions()[0].Mem) {
		t.Fatal("write-through memory differs from the staged image's")
	}
	if staged.Digest() != through.Digest() {
		t.Fatalf("digest %v, staged %v", through.Digest(), staged.Digest())
	}
	if got, want := through.hash.Sum(), guest.ScanMemory(through.Guest().Regions()).Sum(); got != want {
		t.Fatalf("incremental digest %x, scan %x", got, want)
	}
	if c := through.Committed(); c.Epochs != 3 || !c.Consistent {
		t.Fatalf("committed %+v", c)
	}
	if _, _, err := through.Activate(); err != nil {
		t.Fatal(err)
	}
}

// An epoch that fails after writing through tears the image: it commits
// nothing more and never activates. A staged image keeps its committed
// epochs and goes on.
func TestWriteThroughFailedEpochTears(t *testing.T) {
	stream := wtStream(t)
	// Corrupt the second epoch's digest: its pages are read, written
	// through, and the EPOCH-END then fails.
	rd, err := checkpoint.NewReader(bytes.NewReader(stream), checkpoint.Limits{})
	if err != nil {
		t.Fatal(err)
	}
	var endOff int64
	for n := 0; n < 2; {
		s, err := rd.Next(nil)
		if err != nil {
			t.Fatal(err)
		}
		if s.Epoch != nil {
			n++
			endOff = s.Offset + s.WireSize - 1
		}
	}
	bad := bytes.Clone(stream)
	bad[endOff] ^= 0xff // last digest byte: CRC fails, epoch 2 refused
	for _, through := range []bool{false, true} {
		im := NewImage(wtGuest(t))
		if through {
			im.WriteThrough()
		}
		rd, err := checkpoint.NewReader(bytes.NewReader(bad), checkpoint.Limits{})
		if err != nil {
			t.Fatal(err)
		}
		if _, err := rd.ReadEpoch(im); err != nil {
			t.Fatal(err)
		}
		if _, err := rd.ReadEpoch(im); err == nil {
			t.Fatal("a corrupted epoch was accepted")
		}
		im.Discard()
		err = im.EndEpoch(checkpoint.EpochEnd{Epoch: 3})
		if through != errors.Is(err, ErrTorn) {
			t.Fatalf("write-through %v: EndEpoch after a failed epoch: %v", through, err)
		}
		if through {
			im.consistent, im.hasState = true, true // as if state had come: still refused
			if _, _, err := im.Activate(); !errors.Is(err, ErrTorn) {
				t.Fatalf("a torn image activated: %v", err)
			}
		}
	}
}

// A peer that sends the same pages over and over within one epoch does
// not grow a write-through image's record past twice the guest's pages,
// and the digest still takes each page's last write.
func TestWriteThroughRepeatedPagesBounded(t *testing.T) {
	through, staged := NewImage(wtGuest(t)), NewImage(wtGuest(t))
	through.WriteThrough()
	page := make([]byte, guest.PageSize)
	for i := range 5 * wtPages {
		page[0], page[1] = byte(i), byte(i>>8)
		idx := uint64(i % 7)
		for _, im := range []*Image{through, staged} {
			if err := im.StorePage(idx, page); err != nil {
				t.Fatal(err)
			}
		}
		if n := len(through.written); n > 2*wtPages {
			t.Fatalf("after %d writes the record holds %d entries, over %d", i+1, n, 2*wtPages)
		}
	}
	for _, im := range []*Image{through, staged} {
		if err := im.EndEpoch(checkpoint.EpochEnd{Epoch: 1}); err != nil {
			t.Fatal(err)
		}
	}
	if staged.Digest() != through.Digest() {
		t.Fatalf("digest %v, staged %v", through.Digest(), staged.Digest())
	}
	// The memory too, not only the digests: the page buffer was reused
	// for every call, so an image that kept it past StorePage (outside a
	// Reader's BatchPages) would hold its last content in every page.
	for idx := range uint64(7) {
		if !bytes.Equal(through.page(idx), staged.page(idx)) {
			t.Fatalf("page %d: write-through memory differs from the staged image's", idx)
		}
	}
	if scan := guest.CombineDigest(guest.ScanMemory(through.regions).Sum(), through.state); scan != through.Digest() {
		t.Fatal("a scan of the write-through image's memory differs from its digest")
	}
}
