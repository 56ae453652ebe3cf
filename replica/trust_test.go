package replica

import (
	"bufio"
	"context"
	"errors"
	"net"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/tandemvm/tandem/checkpoint"
	"github.com/tandemvm/tandem/guest"
	"github.com/tandemvm/tandem/guest/synth"
)

// sendHello connects to addr, writes h and returns the reply and the
// connection (open, for a stream to follow).
func sendHello(t *testing.T, addr string, h Hello) (HelloReply, net.Conn) {
	t.Helper()
	c, err := net.DialTimeout("tcp", addr, 5*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	c.SetDeadline(time.Now().Add(10 * time.Second))
	h.Proto = ProtoVersion
	h.Format, h.MinReader = uint16(checkpoint.Current), uint16(checkpoint.MinReadable)
	if err := writeLine(c, h); err != nil {
		t.Fatal(err)
	}
	var rep HelloReply
	if err := readLine(bufio.NewReader(c), &rep); err != nil {
		t.Fatalf("reply: %v", err)
	}
	return rep, c
}

// serveOnce runs one Secondary.Serve on a loopback listener.
func serveOnce(t *testing.T, sec *Secondary) (string, <-chan error) {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ln.Close() })
	done := make(chan error, 1)
	go func() {
		conn, err := ln.Accept()
		if err != nil {
			done <- err
			return
		}
		defer conn.Close()
		done <- sec.Serve(context.Background(), conn)
	}()
	return ln.Addr().String(), done
}

func waitServe(t *testing.T, done <-chan error, within time.Duration) error {
	t.Helper()
	select {
	case err := <-done:
		return err
	case <-time.After(within):
		t.Fatalf("Serve still running after %v", within)
		return nil
	}
}

// A Hello naming a disk path is never opened as a path: without a place
// of its own the receiver refuses the guest, with one the disk lives
// there.
func TestReceiverNeverOpensTheSendersDiskPath(t *testing.T) {
	dir := t.TempDir()
	forged := filepath.Join(dir, "forged", "x")
	os.MkdirAll(filepath.Dir(forged), 0o700)
	cfg := guest.Config{Memory: 16 << 20, VCPUs: 1, Workload: guest.Workload{Kind: guest.WorkloadKV}, Disk: forged, Image: "/etc/passwd"}
	var built []guest.Config
	factory := func(kind string, c guest.Config) (guest.Guest, error) {
		built = append(built, c)
		return synthFactory(kind, c)
	}

	// No place for a disk: refused, one line naming why.
	sec := NewSecondary(&Receiver{NewGuest: factory, Build: "test"}, nil)
	addr, done := serveOnce(t, sec)
	rep, _ := sendHello(t, addr, Hello{Purpose: PurposeReplicate, Kind: synth.Kind, Config: cfg})
	if rep.OK || !strings.Contains(rep.Error, "has a disk") || strings.Contains(rep.Error, "\n") {
		t.Fatalf("reply %+v, want a one-line refusal naming the disk", rep)
	}
	if err := waitServe(t, done, 5*time.Second); !errors.Is(err, ErrNoDiskPlace) {
		t.Fatalf("Serve: %v, want ErrNoDiskPlace", err)
	}

	// A place of its own: the disk is built there, 0600.
	local := filepath.Join(dir, "data", "disk.img")
	os.MkdirAll(filepath.Dir(local), 0o700)
	sec = NewSecondary(&Receiver{NewGuest: factory, Build: "test", DiskPath: local}, nil)
	defer sec.Close()
	addr, done = serveOnce(t, sec)
	rep, c := sendHello(t, addr, Hello{Purpose: PurposeReplicate, Kind: synth.Kind, Config: cfg})
	if !rep.OK {
		t.Fatalf("refused: %s", rep.Error)
	}
	c.Close()
	waitServe(t, done, 5*time.Second)
	if len(built) != 1 || built[0].Disk != local || built[0].Image != "" {
		t.Fatalf("guests built with %+v, want one with disk %s and no image", built, local)
	}
	if _, err := os.Stat(forged); !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("the sender's path %s: %v; it must not exist", forged, err)
	}
	fi, err := os.Stat(local)
	if err != nil {
		t.Fatal(err)
	}
	if fi.Mode().Perm() != 0o600 {
		t.Fatalf("disk copy mode %v, want 0600", fi.Mode().Perm())
	}
}

// A sender that trickles its Hello a byte at a time is dropped at the
// handshake deadline, however often it sends.
func TestHandshakeDeadlineIsWhole(t *testing.T) {
	sec := NewSecondary(&Receiver{NewGuest: synthFactory, Build: "test", Timeout: 5 * time.Second, HandshakeTimeout: 500 * time.Millisecond}, nil)
	addr, done := serveOnce(t, sec)
	c, err := net.Dial("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	t0 := time.Now()
	go func() {
		for range 100 {
			if _, err := c.Write([]byte(" ")); err != nil {
				return
			}
			time.Sleep(50 * time.Millisecond)
		}
	}()
	err = waitServe(t, done, 3*time.Second)
	took := time.Since(t0)
	if err == nil || !strings.Contains(err.Error(), "handshake") {
		t.Fatalf("Serve: %v, want a handshake deadline error", err)
	}
	if took > 1500*time.Millisecond {
		t.Fatalf("trickling sender dropped after %v, want about 500ms", took)
	}
}

// An epoch that stages more disk writes than the budget is refused while
// it is staged; the committed image stays.
func TestImageStagingBudget(t *testing.T) {
	cfg := guest.Config{Memory: 16 << 20, VCPUs: 1, Workload: guest.Workload{Kind: guest.WorkloadKV}, Disk: filepath.Join(t.TempDir(), "d.img")}
	g, err := synth.New(cfg)
	if err != nil {
		t.Fatal(err)
	}
	r := &Receiver{MaxEpochDisk: 1 << 20}
	im := r.newImage(g, cfg)
	defer im.Close()
	page := make([]byte, guest.PageSize)
	page[0] = 1
	if err := im.StorePage(3, page); err != nil {
		t.Fatal(err)
	}
	if err := im.EndEpoch(checkpoint.EpochEnd{Epoch: 1, Pages: 1}); err != nil {
		t.Fatal(err)
	}
	before := im.Digest()
	// Every page of the guest fits (memory is in the budget) ...
	for i := uint64(0); i < cfg.Memory/guest.PageSize; i++ {
		if err := im.StorePage(i, page); err != nil {
			t.Fatalf("page %d: %v", i, err)
		}
	}
	// ... and so does the disk budget (1 MiB, and an eighth of it for
	// the bookkeeping of writes), but not more.
	half := make([]byte, 512<<10)
	if err := im.StoreDisk([]guest.DiskWrite{{Offset: 0, Data: half}, {Offset: 0, Data: half}}); err != nil {
		t.Fatal(err)
	}
	err = im.StoreDisk([]guest.DiskWrite{{Offset: 0, Data: half}})
	if !errors.Is(err, ErrStagingBudget) {
		t.Fatalf("third disk write: %v, want ErrStagingBudget", err)
	}
	// Empty writes cost their bookkeeping: a flood of them is cut too.
	im.Discard()
	empty := make([]guest.DiskWrite, 65536)
	var floodErr error
	for i := 0; i < 100 && floodErr == nil; i++ {
		floodErr = im.StoreDisk(empty)
	}
	if !errors.Is(floodErr, ErrStagingBudget) {
		t.Fatalf("a flood of empty disk writes: %v, want ErrStagingBudget", floodErr)
	}
	im.Discard()
	if im.Digest() != before || im.Committed().Epoch != 1 {
		t.Fatalf("committed image changed by a refused epoch")
	}
	// A new epoch starts with the whole budget again.
	if err := im.StoreDisk([]guest.DiskWrite{{Offset: 0, Data: half}}); err != nil {
		t.Fatalf("after discard: %v", err)
	}
}

// A stream of compressed disk writes with no EPOCH-END is cut at the
// staging budget: Serve ends with ErrStagingBudget, the connection is
// dropped.
func TestSecondaryDropsAStagingFlood(t *testing.T) {
	dir := t.TempDir()
	cfg := guest.Config{Memory: 16 << 20, VCPUs: 1, Workload: guest.Workload{Kind: guest.WorkloadKV}, Disk: "/nonexistent/x"}
	sec := NewSecondary(&Receiver{NewGuest: synthFactory, Build: "test", DiskPath: filepath.Join(dir, "disk.img"), MaxEpochDisk: 32 << 20}, nil)
	defer sec.Close()
	addr, done := serveOnce(t, sec)
	rep, c := sendHello(t, addr, Hello{Purpose: PurposeReplicate, Kind: synth.Kind, Config: cfg})
	if !rep.OK {
		t.Fatalf("refused: %s", rep.Error)
	}
	w, err := checkpoint.NewWriter(c, checkpoint.Header{Build: "x", Kind: synth.Kind, PageSize: guest.PageSize,
		Regions: []checkpoint.MemRegion{{GPA: 0, Size: cfg.Memory}}}, checkpoint.Options{})
	if err != nil {
		t.Fatal(err)
	}
	zeros := make([]byte, 16<<20)
	var sent int
	for sent = 0; sent < 64; sent++ {
		if err := w.WriteDisk([]guest.DiskWrite{{Offset: 0, Data: zeros}}); err != nil {
			break // the secondary hung up
		}
	}
	err = waitServe(t, done, 10*time.Second)
	if !errors.Is(err, ErrStagingBudget) {
		t.Fatalf("Serve: %v, want ErrStagingBudget", err)
	}
	if st := sec.Status(false); st.Consistent || st.LastCommittedEpoch != 0 {
		t.Fatalf("status after the flood: %+v", st)
	}
	t.Logf("flood of 16 MiB sections cut: %v", err)
}
