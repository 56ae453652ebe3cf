package ft

import (
	"errors"
	"net"
	"os"
	"runtime"
	"strings"
	"testing"
	"time"

	"github.com/tandemvm/tandem/replica"
)

// serveLost runs p's Target as start does, over fresh loopback channels,
// cuts the link and waits until the run waits for a resume.
func serveLost(t *testing.T, p *pcInbound) {
	t.Helper()
	srcU, dstU := tcpPair(t)
	srcB, dstB := tcpPair(t)
	p.mu.Lock()
	tg := p.tg
	p.conns = map[string]net.Conn{replica.ChannelUrgent: dstU, replica.ChannelBulk: dstB}
	p.mu.Unlock()
	p.run(tg, lostID)
	srcU.Close()
	srcB.Close()
	for deadline := time.Now().Add(10 * time.Second); ; time.Sleep(time.Millisecond) {
		p.mu.Lock()
		waiting := p.waiting != nil
		p.mu.Unlock()
		if waiting {
			return
		}
		if time.Now().After(deadline) {
			t.Fatal("the run did not wait for a resume after a lost link")
		}
	}
}

// An abandon that lands just after a resume handed its channels over
// (before the run took them) finds the source connected: it is refused,
// and the run neither panics on channels the abandon took away nor
// outlives the abort. On one P the woken run is not scheduled before
// the abandon, so each round hits the window the review found (the
// run then read nil channels and panicked about half the time).
func TestAbandonRacingResume(t *testing.T) {
	defer runtime.GOMAXPROCS(runtime.GOMAXPROCS(1))
	for range 10 {
		p, _ := lostTarget(t)
		serveLost(t, p)
		_, u := tcpPair(t)
		_, b := tcpPair(t)
		for ch, c := range map[string]net.Conn{replica.ChannelUrgent: u, replica.ChannelBulk: b} {
			if err := p.take(replica.Hello{MigrationID: lostID, Channel: ch, Resume: true}, c); err != nil {
				t.Fatal(err)
			}
		}
		if _, _, err := p.abandon(""); err == nil || !strings.Contains(err.Error(), "connected") {
			t.Errorf("abandon just after a resume handed over: %v, want refused (the source is connected)", err)
		}
		p.abort()
	}
}

// An abandon while a resume is half made (one channel in) closes that
// channel, and a later channel of the migration is refused as
// abandoned: nothing of the resume stays open.
func TestAbandonClosesHalfResume(t *testing.T) {
	p, _ := lostTarget(t)
	serveLost(t, p)
	src, dst := tcpPair(t)
	if err := p.take(replica.Hello{MigrationID: lostID, Channel: replica.ChannelUrgent, Resume: true}, dst); err != nil {
		t.Fatal(err)
	}
	if _, _, err := p.abandon(lostID); err != nil {
		t.Fatal(err)
	}
	src.SetReadDeadline(time.Now().Add(5 * time.Second))
	if n, err := src.Read(make([]byte, 1)); err == nil || errors.Is(err, os.ErrDeadlineExceeded) {
		t.Errorf("the half-made resume's channel after the abandon: read %d, %v; want it closed", n, err)
	}
	p.mu.Lock()
	left, waiting := len(p.resumeConns), p.waiting != nil
	p.mu.Unlock()
	if left != 0 || waiting {
		t.Errorf("after the abandon: %d resume channels kept, waiting %v", left, waiting)
	}
	_, b := tcpPair(t)
	err := p.take(replica.Hello{MigrationID: lostID, Channel: replica.ChannelBulk, Resume: true}, b)
	if err == nil || !strings.Contains(err.Error(), "was abandoned here") {
		t.Errorf("the resume's other channel after the abandon: %v, want refused as abandoned", err)
	}
}

// A run that fails on something other than its link (here a frame of an
// unknown type) cannot be resumed: status says postcopy-failed, why and
// that only an abandon is left (not "resume the migration"); a resume's
// channel is refused naming the failure, with the word that the
// migration is gone; an abandon is accepted.
func TestPostcopyFailedForGoodOffersNoResume(t *testing.T) {
	p, _ := lostTarget(t)
	srcU, dstU := tcpPair(t)
	srcB, dstB := tcpPair(t)
	defer srcU.Close()
	p.conns = map[string]net.Conn{replica.ChannelUrgent: dstU, replica.ChannelBulk: dstB}
	p.run(p.tg, lostID)
	if _, err := srcB.Write([]byte{0xee, 0, 0, 0, 0, 0, 0, 0, 0}); err != nil {
		t.Fatal(err)
	}
	var st nodeStatus
	for deadline := time.Now().Add(10 * time.Second); st.Status != statusPostcopyFailed; time.Sleep(5 * time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatalf("status after a protocol error: %+v, want %s", st.MigrationStatus, statusPostcopyFailed)
		}
		st = nodeStatus{}
		p.fill(&st)
	}
	if !strings.Contains(st.Error, "unknown frame type") || !strings.Contains(st.StateReason, "no resume can continue it") || strings.Contains(st.StateReason, "--resume") {
		t.Errorf("failed run's status: error %q, reason %q", st.Error, st.StateReason)
	}
	_, c := tcpPair(t)
	err := p.take(replica.Hello{MigrationID: lostID, Channel: replica.ChannelUrgent, Resume: true}, c)
	if !errors.Is(err, replica.ErrPostcopyGone) || !strings.Contains(err.Error(), "unknown frame type") {
		t.Errorf("resume after a failure for good: %v, want refused naming it", err)
	}
	if _, _, err := p.abandon(lostID); err != nil {
		t.Errorf("abandon after a failure for good: %v", err)
	}
}
