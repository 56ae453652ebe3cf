package replica

import (
	"bytes"
	"errors"
	"fmt"
	"math/rand/v2"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/tandemvm/tandem/checkpoint"
	"github.com/tandemvm/tandem/guest"
	"github.com/tandemvm/tandem/guest/synth"
	"github.com/tandemvm/tandem/internal/vfs"
)

// storedState is what one stored epoch holds: the image's digest (memory
// and state) and the whole disk.
type storedState struct {
	digest string
	disk   []byte
}

// buildStore writes a store on m of a synth guest with a disk: a full
// image at epoch 1, then epochs 2..4 each changing pages and the disk.
// It returns the store's file and each epoch's state.
func buildStore(t *testing.T, m *vfs.MemFS) (string, map[uint64]storedState) {
	t.Helper()
	if err := vfs.MkdirAllSync(m, sweepSecDir, 0o700); err != nil {
		t.Fatal(err)
	}
	cfg := guest.Config{Memory: 4 << 20, VCPUs: 1, Disk: sweepDisk, Workload: guest.Workload{Kind: guest.WorkloadKV}}
	g, err := synth.NewWithOptions(cfg, synth.Options{DiskFS: m})
	if err != nil {
		t.Fatal(err)
	}
	defer g.Close()
	st, err := g.SaveState()
	if err != nil {
		t.Fatal(err)
	}
	im := NewImage(g)
	im.Record()
	states := map[uint64]storedState{}
	rng := rand.New(rand.NewPCG(1, 2))
	commit := func(e uint64) {
		t.Helper()
		for range 8 {
			p := make([]byte, guest.PageSize)
			for i := range p {
				p[i] = byte(rng.Uint32())
			}
			if err := im.StorePage(rng.Uint64N(1024), p); err != nil {
				t.Fatal(err)
			}
		}
		blk := bytes.Repeat([]byte{byte(e)}, 4096)
		if err := im.StoreDisk([]guest.DiskWrite{{Offset: rng.Uint64N(64) * 4096, Data: blk}}); err != nil {
			t.Fatal(err)
		}
		if err := im.StoreDevices(st); err != nil {
			t.Fatal(err)
		}
		if err := im.EndEpoch(checkpoint.EpochEnd{Epoch: e}); err != nil {
			t.Fatal(err)
		}
		disk, err := vfs.ReadFile(m, sweepDisk)
		if err != nil {
			t.Fatal(err)
		}
		states[e] = storedState{digest: im.Digest().String(), disk: disk}
	}
	commit(1)
	s, err := OpenStoreWith(sweepStore, nil, StoreOptions{FS: m, Sync: SyncDisk})
	if err != nil {
		t.Fatal(err)
	}
	if err := s.Begin(im, Hello{Purpose: PurposeReplicate, Kind: synth.Kind, Config: cfg, Build: "test"}); err != nil {
		t.Fatal(err)
	}
	for e := uint64(2); e <= 4; e++ {
		commit(e)
		pages, ms, disk := im.LastCommit()
		if err := s.Append(im, checkpoint.EpochEnd{Epoch: e}, pages, ms, disk); err != nil {
			t.Fatal(err)
		}
	}
	s.Close()
	return sweepStore + "/" + storeFile, states
}

func loadOn(m *vfs.MemFS) (*Image, bool, error) {
	r := &Receiver{Build: "test", Timeout: 5 * time.Second, DiskPath: sweepDisk,
		NewGuest: func(kind string, c guest.Config) (guest.Guest, error) {
			return synth.NewWithOptions(c, synth.Options{DiskFS: m})
		}}
	s, err := OpenStoreWith(sweepStore, nil, StoreOptions{FS: m})
	if err != nil {
		return nil, false, err
	}
	im, _, ok, err := s.Load(r)
	return im, ok, err
}

func writeAll(t *testing.T, m *vfs.MemFS, path string, b []byte) {
	t.Helper()
	if err := vfs.WriteFile(m, path, b, 0o600); err != nil {
		t.Fatal(err)
	}
}

// A stored image that loads is exactly one stored epoch, memory and disk.
func TestStoreLoadsMemoryAndDiskOfOneEpoch(t *testing.T) {
	m := vfs.NewMemFS(1)
	_, states := buildStore(t, m)
	// The disk file is left ahead of (or apart from) image.tnd, as a
	// crash between an epoch's disk and its memory leaves it: Load must
	// not trust it.
	writeAll(t, m, sweepDisk, bytes.Repeat([]byte{0xee}, 300<<10))
	im, ok, err := loadOn(m)
	if err != nil || !ok {
		t.Fatalf("Load: ok=%v err=%v", ok, err)
	}
	defer im.Guest().Close()
	c := im.Committed()
	disk, _ := vfs.ReadFile(m, sweepDisk)
	want := states[c.Epoch]
	if c.Epoch != 4 || im.Digest().String() != want.digest || !sameDisk(disk, want.disk) {
		t.Fatalf("loaded epoch %d: digest match %v, disk match %v", c.Epoch, im.Digest().String() == want.digest, sameDisk(disk, want.disk))
	}
}

// Bad input: a torn or corrupt image.tnd is refused with one line naming
// it and the disk file untouched, or loads as exactly one stored epoch
// (a damaged tail is a torn last epoch, dropped); it never panics.
func TestStoreCorruptImageRefusedOrWhole(t *testing.T) {
	m := vfs.NewMemFS(1)
	path, states := buildStore(t, m)
	good, err := vfs.ReadFile(m, path)
	if err != nil {
		t.Fatal(err)
	}
	marker := bytes.Repeat([]byte{0x5a}, 8192)
	type damage struct {
		name string
		b    []byte
	}
	var cases []damage
	cases = append(cases,
		damage{"empty", nil},
		damage{"hello line garbage", append([]byte("{not json\n"), good[bytes.IndexByte(good, '\n')+1:]...)},
		damage{"hello only", good[:bytes.IndexByte(good, '\n')+1]},
	)
	for _, cut := range []int{len(good) / 100, len(good) / 10, len(good) / 2, len(good) - 1} {
		cases = append(cases, damage{fmt.Sprintf("truncated at %d", cut), good[:cut]})
	}
	rng := rand.New(rand.NewPCG(3, 4))
	for range 60 {
		b := bytes.Clone(good)
		off := rng.IntN(len(b))
		b[off] ^= byte(1 + rng.IntN(255))
		cases = append(cases, damage{fmt.Sprintf("byte %d flipped", off), b})
	}
	outcomes := map[string]int{}
	for _, c := range cases {
		writeAll(t, m, path, c.b)
		writeAll(t, m, sweepDisk, marker)
		im, ok, err := loadOn(m)
		disk, _ := vfs.ReadFile(m, sweepDisk)
		switch {
		case err != nil:
			if !strings.Contains(err.Error(), path) || strings.Contains(err.Error(), "\n") {
				t.Fatalf("%s: the refusal must be one line naming %s: %q", c.name, path, err)
			}
			if !bytes.Equal(disk, marker) {
				t.Fatalf("%s: refused, but the disk file was changed", c.name)
			}
			outcomes["refused"]++
		case !ok:
			if !bytes.Equal(disk, marker) {
				t.Fatalf("%s: nothing loaded, but the disk file was changed", c.name)
			}
			outcomes["nothing"]++
		default:
			e := im.Committed().Epoch
			want, stored := states[e]
			if !stored || im.Digest().String() != want.digest || !sameDisk(disk, want.disk) {
				t.Fatalf("%s: loaded epoch %d that is not a stored epoch whole (stored %v)", c.name, e, stored)
			}
			im.Guest().Close()
			outcomes[fmt.Sprintf("epoch %d", e)]++
		}
	}
	t.Logf("outcomes of %d damaged files: %v", len(cases), outcomes)
	if outcomes["refused"] == 0 {
		t.Fatal("no damage was refused: the test does not reach the refusal")
	}
}

// An image.tnd whose full epoch has no disk contents (written before the
// disk was stored with the memory) is refused, naming the file.
func TestStoreWithoutDiskContentsRefused(t *testing.T) {
	m := vfs.NewMemFS(1)
	path, _ := buildStore(t, m)
	// Rewrite the store as an older build did: the same image with its
	// full epoch's disk contents left out.
	s, _ := OpenStoreWith(sweepStore, nil, StoreOptions{FS: m})
	im, ok, err := loadOn(m)
	if err != nil || !ok {
		t.Fatal(err)
	}
	defer im.Guest().Close()
	h := Hello{Purpose: PurposeReplicate, Kind: synth.Kind, Config: guest.Config{Memory: 4 << 20, VCPUs: 1, Disk: sweepDisk,
		Workload: guest.Workload{Kind: guest.WorkloadKV}}, Build: "old"}
	s.hello, s.regions = h, im.g.Regions()
	s.hello.Config.Disk = "" // writeImage then leaves the disk out
	if err := s.rewrite(im); err != nil {
		t.Fatal(err)
	}
	s.Close()
	// Put the Hello's disk back, as the old build wrote it.
	b, _ := vfs.ReadFile(m, path)
	nl := bytes.IndexByte(b, '\n')
	h.Proto = ProtoVersion
	withHello := func(h Hello) {
		var hb bytes.Buffer
		if err := writeLine(&hb, h); err != nil {
			t.Fatal(err)
		}
		writeAll(t, m, path, append(hb.Bytes(), b[nl+1:]...))
	}
	h.Store = &StoreStamp{Sync: "disk"}
	withHello(h)
	_, _, err = loadOn(m)
	if err == nil || !strings.Contains(err.Error(), "no disk contents") || !strings.Contains(err.Error(), path) {
		t.Fatalf("a store without disk contents: %v", err)
	}
	// Without the stamp (an older build) it is refused before the disk
	// file is touched: whether it was fsynced is unknown.
	h.Store = nil
	withHello(h)
	marker := []byte("untouched")
	writeAll(t, m, sweepDisk, marker)
	_, _, err = loadOn(m)
	if !errors.Is(err, ErrStoreMayLack) || !strings.Contains(err.Error(), path) {
		t.Fatalf("a store without its stamp: %v", err)
	}
	if disk, _ := vfs.ReadFile(m, sweepDisk); !bytes.Equal(disk, marker) {
		t.Fatal("a refused store changed the disk file")
	}
}

// A stored image whose Hello asks for more memory than this receiver
// takes is refused before any guest is built, as the same Hello from the
// network would be.
func TestStoreHelloBoundedLikeTheNetworks(t *testing.T) {
	m := vfs.NewMemFS(1)
	path, _ := buildStore(t, m)
	built := false
	r := &Receiver{Build: "test", Timeout: 5 * time.Second, DiskPath: sweepDisk, MaxMemory: 2 << 20,
		NewGuest: func(kind string, c guest.Config) (guest.Guest, error) {
			built = true
			return synth.NewWithOptions(c, synth.Options{DiskFS: m})
		}}
	s, err := OpenStoreWith(sweepStore, nil, StoreOptions{FS: m})
	if err != nil {
		t.Fatal(err)
	}
	_, _, ok, err := s.Load(r)
	if ok || err == nil || !strings.Contains(err.Error(), "larger than this receiver takes") || !strings.Contains(err.Error(), path) {
		t.Fatalf("a 4 MiB stored guest with a 2 MiB bound: ok=%v err=%v", ok, err)
	}
	if built {
		t.Fatal("a guest was built for an image over the bound")
	}
}

// Opening a store removes what a cut-short compaction or clean mark left.
func TestStoreOpenRemovesLeftovers(t *testing.T) {
	m := vfs.NewMemFS(1)
	if err := vfs.MkdirAllSync(m, sweepStore, 0o700); err != nil {
		t.Fatal(err)
	}
	for _, name := range []string{storeFile + ".new", vfs.TempName(storeSyncFile)} {
		writeAll(t, m, filepath.Join(sweepStore, name), []byte("partial"))
	}
	if _, err := OpenStoreWith(sweepStore, nil, StoreOptions{FS: m}); err != nil {
		t.Fatal(err)
	}
	for _, name := range []string{storeFile + ".new", vfs.TempName(storeSyncFile)} {
		if _, err := m.Stat(filepath.Join(sweepStore, name)); err == nil {
			t.Errorf("%s left after open", name)
		}
	}
}
