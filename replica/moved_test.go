package replica

import (
	"context"
	"errors"
	"io"
	"strings"
	"testing"
	"time"

	"github.com/tandemvm/tandem/checkpoint"
	"github.com/tandemvm/tandem/internal/vfs"
)

// restartSecondary is a new secondary on the store directory dir of m,
// its stored image loaded (a secondary's process restarted).
func restartSecondary(t *testing.T, m *vfs.MemFS, dir string) *Secondary {
	t.Helper()
	store, err := OpenStoreWith(dir, nil, StoreOptions{FS: m})
	if err != nil {
		t.Fatal(err)
	}
	sec := NewSecondary(&Receiver{NewGuest: synthFactory, Build: "test", Timeout: 5 * time.Second}, nil)
	sec.Store = store
	t.Cleanup(sec.Close)
	if _, ok, err := sec.LoadStored(); !ok || err != nil {
		t.Fatalf("the stored image after a restart: ok %v, %v", ok, err)
	}
	return sec
}

// A secondary that retired after a move stays retired when it is
// restarted from its data directory (rev2's finding 1: the mark lived in
// memory only, and a restarted secondary activated a second copy of a
// guest that runs at the destination), until a primary syncs a full
// image to it again.
func TestRetiredSecondaryStaysRetiredAfterRestart(t *testing.T) {
	m := vfs.NewMemFS(1)
	const dir = "/data/image"
	store, err := OpenStoreWith(dir, nil, StoreOptions{FS: m})
	if err != nil {
		t.Fatal(err)
	}
	mp := startMovingPairStore(t, store)
	n, err := mp.notice(t, mp.epoch)
	if err != nil {
		t.Fatal(err)
	}
	if err := n.Commit(5 * time.Second); err != nil {
		t.Fatalf("commit: %v", err)
	}
	mp.stop()

	sec := restartSecondary(t, m, dir)
	if mv, ok := sec.Move(); !ok || !mv.Done || mv.MigrationID != "m1" || mv.Epoch != mp.epoch {
		t.Errorf("the move after a restart: %+v %v, want retired by m1 at epoch %d", mv, ok, mp.epoch)
	}
	if _, _, _, err := sec.Activate(); !errors.Is(err, ErrMoved) || !strings.Contains(err.Error(), "10.0.0.9:7000") {
		t.Fatalf("activation of a restarted retired secondary: %v, want ErrMoved naming the destination", err)
	}
	sec.Close()

	// A primary's full image replaces the one the move left behind: the
	// restarted secondary protects that guest and may be activated.
	store2, err := OpenStoreWith(dir, nil, StoreOptions{FS: m})
	if err != nil {
		t.Fatal(err)
	}
	mp2 := startMovingPairStore(t, store2)
	if _, ok := mp2.sec.Move(); ok {
		t.Error("a fresh primary's sync left the move on record")
	}
	mp2.stop()
	sec = restartSecondary(t, m, dir)
	if _, ok := sec.Move(); ok {
		t.Error("the move marker outlived a primary's full sync")
	}
	g, _, _, err := sec.Activate()
	if err != nil {
		t.Fatalf("activation after a primary's full sync: %v", err)
	}
	g.Close()
}

// A move marker that cannot be read counts as a retirement: a secondary
// that may have retired does not offer its image.
func TestUnreadableMoveMarkerRefusesActivation(t *testing.T) {
	m := vfs.NewMemFS(2)
	const dir = "/data/image"
	store, err := OpenStoreWith(dir, nil, StoreOptions{FS: m})
	if err != nil {
		t.Fatal(err)
	}
	mp := startMovingPairStore(t, store)
	mp.stop()
	if err := vfs.WriteFileAtomic(m, dir+"/"+storeMovedFile, 0o600, func(w io.Writer) error {
		_, err := w.Write([]byte("{not json"))
		return err
	}); err != nil {
		t.Fatal(err)
	}
	sec := restartSecondary(t, m, dir)
	if _, _, _, err := sec.Activate(); !errors.Is(err, ErrMoved) {
		t.Fatalf("activation with an unreadable move marker: %v, want ErrMoved", err)
	}
}

// cutNotice closes the secondary's end of the open move notice (a
// network blip the primary notices on its next heartbeat).
func cutNotice(t *testing.T, s *Secondary) {
	t.Helper()
	s.mu.Lock()
	c := s.moveConn
	s.mu.Unlock()
	if c == nil {
		t.Fatal("no move notice open")
	}
	c.Close()
}

// A move notice whose heartbeat fails says so (Lost) and is reopened for
// the same migration, so the secondary hears the primary again (rev2's
// finding 6: the primary went silent for good, and the secondary could
// be activated without --force while it lived). A commit whose
// connection is gone asks again on a new one, and a secondary that
// already retired by this migration answers so on the handshake.
func TestMoveNoticeReopensAndCommitAsksAgain(t *testing.T) {
	mp := startMovingPair(t)
	n, err := mp.notice(t, mp.epoch)
	if err != nil {
		t.Fatal(err)
	}
	defer n.Close()
	cutNotice(t, mp.sec)
	waitFor(t, "the notice's loss on the primary", func() bool { why, _ := n.Lost(); return why != "" })
	deadline := time.Now().Add(5 * time.Second)
	for {
		why, _ := n.Lost()
		mv, _ := mp.sec.Move()
		if why == "" && mv.Open {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("the notice was not reopened within 5 s: primary says %q, secondary %+v", why, mv)
		}
		time.Sleep(10 * time.Millisecond)
	}
	cutNotice(t, mp.sec) // the commit finds its connection gone
	if err := n.Commit(5 * time.Second); err != nil {
		t.Fatalf("commit over a cut notice: %v, want it asked again and taken", err)
	}
	if mv, _ := mp.sec.Move(); !mv.Done {
		t.Fatalf("after the commit: %+v, want retired", mv)
	}
	h := mp.hello
	h.MigrationID, h.Destination, h.FinalEpoch = "m1", "10.0.0.9:7000", mp.epoch
	h.Proto, h.Purpose = ProtoVersion, PurposeMoving
	h.Format, h.MinReader = uint16(checkpoint.Current), uint16(checkpoint.MinReadable)
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	if _, _, err := dialMoveNotice(ctx, mp.addr, h, DialOptions{}); !errors.Is(err, ErrMoved) {
		t.Fatalf("asking a secondary retired by this migration: %v, want ErrMoved", err)
	}
	h.MigrationID = "m2"
	if _, _, err := dialMoveNotice(ctx, mp.addr, h, DialOptions{}); err == nil || errors.Is(err, ErrMoved) {
		t.Fatalf("another migration asking: %v, want a plain refusal", err)
	}
}

// A notice that was down and then committed is not reported down any
// more.
func TestMoveNoticeLostClearedByCommit(t *testing.T) {
	mp := startMovingPair(t)
	n, err := mp.notice(t, mp.epoch)
	if err != nil {
		t.Fatal(err)
	}
	cutNotice(t, mp.sec)
	waitFor(t, "the notice's loss on the primary", func() bool { why, _ := n.Lost(); return why != "" })
	if err := n.Commit(5 * time.Second); err != nil {
		t.Fatalf("commit: %v", err)
	}
	if why, _ := n.Lost(); why != "" {
		t.Fatalf("after the commit the notice is still reported down: %q", why)
	}
}
