package ft

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"strings"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/tandemvm/tandem/api"
	"github.com/tandemvm/tandem/guest"
	"github.com/tandemvm/tandem/postcopy"
	"github.com/tandemvm/tandem/precopy"
	"github.com/tandemvm/tandem/replica"
)

// The source's paused post-copy: a lost link shows in status as
// postcopy-paused (since when, why, the outcome naming --resume); one
// resume at a time; a failed one leaves it paused; a good one hands the
// new connections to the waiting run and clears the pause; a resume with
// nothing paused is refused; the node's close ends the wait.
func TestPostcopySourcePause(t *testing.T) {
	pipe := func() net.Conn {
		a, b := net.Pipe()
		b.Close()
		return a
	}
	p := &pcSource{log: slog.New(slog.NewTextHandler(io.Discard, nil)), urgent: pipe(), bulk: pipe(), paused: newPcPause()}
	status := func() api.MigrationStatus {
		st := api.MigrationStatus{Status: precopy.StatusActive, PostcopyActive: true}
		p.fill(&st)
		return st
	}
	if err := p.beginResume("m1", "active"); err == nil || !strings.Contains(err.Error(), "not paused") {
		t.Errorf("resume while the link is up: %v, want a refusal", err)
	}
	waitPaused := func() {
		t.Helper()
		deadline := time.Now().Add(5 * time.Second)
		for status().Status != precopy.StatusPostcopyPaused {
			if time.Now().After(deadline) {
				t.Fatal("not paused after a lost link")
			}
			time.Sleep(time.Millisecond)
		}
	}
	resumed := make(chan bool, 1)
	go func() {
		resumed <- p.awaitResume(context.Background(), errors.New("post-copy link failed: read: i/o timeout")) == nil
	}()
	waitPaused()
	if st := status(); st.PostcopyLinkDownSince == "" || !strings.Contains(st.PostcopyLinkError, "i/o timeout") || !strings.Contains(st.Outcome, "--resume") {
		t.Errorf("paused status %+v: want since when, why and the outcome naming --resume", st)
	}
	if err := p.beginResume("m1", "postcopy-paused"); err != nil {
		t.Fatal(err)
	}
	if err := p.beginResume("m1", "postcopy-paused"); err == nil || !strings.Contains(err.Error(), "another resume") {
		t.Errorf("a second resume at once: %v, want a refusal", err)
	}
	if err := p.endResume(nil, nil, errors.New("dial: refused"), true); err == nil || status().Status != precopy.StatusPostcopyPaused {
		t.Errorf("a failed resume: %v, status %s: want the error and still paused", err, status().Status)
	}
	if err := p.beginResume("m1", "postcopy-paused"); err != nil {
		t.Fatal(err)
	}
	u, b := pipe(), pipe()
	if err := p.endResume(u, b, nil, true); err != nil {
		t.Fatal(err)
	}
	if !<-resumed {
		t.Fatal("the waiting run was not resumed")
	}
	if st := status(); st.Status == precopy.StatusPostcopyPaused || st.PostcopyResumes != 1 || p.urgent != u || p.bulk != b {
		t.Errorf("after the resume: status %s, %d resumes, new connections in place %v", st.Status, st.PostcopyResumes, p.urgent == u && p.bulk == b)
	}
	go func() { resumed <- p.awaitResume(context.Background(), errors.New("lost again")) == nil }()
	waitPaused()
	p.stop()
	if <-resumed {
		t.Error("the wait went on after the node's close")
	}
	if st := status(); st.Status == precopy.StatusPostcopyPaused {
		t.Errorf("status after the close: %s, want the pause gone", st.Status)
	}
	p.close()
}

// A resume refused by a destination that no longer holds the migration
// (abandoned, failed for good, restarted) ends the pause: the serving
// ends with that refusal, status no longer offers a resume but says
// none can continue it, and a later resume is refused here.
func TestPostcopySourcePauseEndsWhenDestinationGone(t *testing.T) {
	pipe := func() net.Conn {
		a, b := net.Pipe()
		b.Close()
		return a
	}
	p := &pcSource{log: quietLog(), urgent: pipe(), bulk: pipe(), paused: newPcPause()}
	defer p.close()
	ended := make(chan error, 1)
	go func() { ended <- p.awaitResume(context.Background(), errors.New("post-copy link failed: EOF")) }()
	for deadline := time.Now().Add(5 * time.Second); p.beginResume("m1", "paused") != nil; time.Sleep(time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatal("not paused after a lost link")
		}
	}
	refusal := fmt.Errorf("refused: post-copy migration \"m1\" was abandoned here: %w", replica.ErrPostcopyGone)
	// Another receiver's word (a --to typed wrong) leaves it paused.
	if err := p.endResume(nil, nil, refusal, false); !errors.Is(err, replica.ErrPostcopyGone) {
		t.Errorf("the resume's answer: %v, want the receiver's refusal", err)
	}
	if err := p.beginResume("m1", "paused"); err != nil {
		t.Fatalf("after another receiver's refusal: %v, want still paused", err)
	}
	if err := p.endResume(nil, nil, refusal, true); !errors.Is(err, replica.ErrPostcopyGone) {
		t.Errorf("the resume's answer: %v, want the destination's refusal", err)
	}
	select {
	case err := <-ended:
		if err == nil || !strings.Contains(err.Error(), "gave the migration up") || !strings.Contains(err.Error(), "abandoned here") {
			t.Errorf("the serving ended with %v, want the destination's refusal", err)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("the pause went on after the destination gave the migration up")
	}
	st := api.MigrationStatus{Status: precopy.StatusUnknown}
	p.fill(&st)
	if st.Status == precopy.StatusPostcopyPaused || strings.Contains(st.Outcome, "--resume") || !strings.Contains(st.Outcome, "no resume can continue it") {
		t.Errorf("status once the destination gave up: %s, outcome %q", st.Status, st.Outcome)
	}
	if err := p.beginResume("m1", "unknown"); err == nil || !strings.Contains(err.Error(), "not paused") {
		t.Errorf("a resume after the end: %v, want a refusal", err)
	}
}

// tcpPair is a connected loopback TCP pair (closed at the test's end).
func tcpPair(t *testing.T) (net.Conn, net.Conn) {
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

// The destination's side of a resume, with a real Target and Source:
// a resume is refused while the link is up and for another migration
// (naming both ids); once the run's link is lost, status says
// postcopy-paused, and a resume's two channels (in any order) start a
// new run that completes with the source's digest.
func TestPostcopyDestinationResume(t *testing.T) {
	const pages = 32
	mapped := func() guest.Region {
		mem, err := unix.Mmap(-1, 0, pages*guest.PageSize, unix.PROT_READ|unix.PROT_WRITE, unix.MAP_PRIVATE|unix.MAP_ANONYMOUS)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { unix.Munmap(mem) })
		return guest.Region{Mem: mem}
	}
	src, dst := mapped(), mapped()
	missing := precopy.NewBitmap(pages)
	for p := range pages {
		src.Mem[p*guest.PageSize] = byte(p + 1)
		if p%4 == 0 {
			missing.Set(uint64(p))
		} else {
			dst.Mem[p*guest.PageSize] = byte(p + 1)
		}
	}
	if err := postcopy.Available([]guest.Region{dst}); err != nil {
		t.Skipf("userfaultfd: %v", err)
	}
	state := guest.MachineState{Kind: "test"}
	tg, err := postcopy.NewTarget(postcopy.TargetConfig{Regions: []guest.Region{dst}, Missing: missing, State: state})
	if err != nil {
		t.Fatal(err)
	}
	srcU, dstU := tcpPair(t)
	srcB, dstB := tcpPair(t)
	p := &pcInbound{log: slog.New(slog.NewTextHandler(io.Discard, nil)), id: "m1", tg: tg,
		conns: map[string]net.Conn{replica.ChannelUrgent: dstU, replica.ChannelBulk: dstB}}
	p.run(tg, "m1")
	resume := func(id, ch string, conn net.Conn) error {
		return p.take(replica.Hello{Purpose: replica.PurposePostcopy, MigrationID: id, Channel: ch, Resume: true}, conn)
	}
	if err := resume("m1", replica.ChannelUrgent, nil); err == nil || !strings.Contains(err.Error(), "link is up") {
		t.Errorf("resume with the link up: %v, want a refusal", err)
	}
	if err := resume("m2", replica.ChannelUrgent, nil); err == nil || !strings.Contains(err.Error(), `holds post-copy migration "m1"; asked to resume "m2"`) {
		t.Errorf("resume of another migration: %v, want a refusal naming both", err)
	}
	srcU.Close() // the link is lost
	srcB.Close()
	var st nodeStatus
	for deadline := time.Now().Add(10 * time.Second); st.Status != precopy.StatusPostcopyPaused || st.PostcopyLinkDownSince == ""; {
		if time.Now().After(deadline) {
			t.Fatalf("destination not paused after a lost link: %+v", st)
		}
		time.Sleep(5 * time.Millisecond)
		st = nodeStatus{}
		p.fill(&st)
	}
	if st.PostcopyLinkDownSince == "" || st.PostcopyLinkError == "" || st.PostcopyRemainingPages != pages/4 || st.MigrationID != "m1" {
		t.Errorf("paused destination: %+v: want since when, why, %d pages owed, the id", st, pages/4)
	}
	srcU, dstU = tcpPair(t)
	srcB, dstB = tcpPair(t)
	if err := resume("m1", replica.ChannelBulk, dstB); err != nil { // bulk may come first
		t.Fatal(err)
	}
	if err := resume("m1", replica.ChannelUrgent, dstU); err != nil {
		t.Fatal(err)
	}
	s := postcopy.NewSource([]guest.Region{src}, guest.CombineDigest(guest.ScanMemory([]guest.Region{src}).Sum(), state))
	rctx, rcancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer rcancel()
	if err := s.Run(rctx, srcU, srcB); err != nil {
		t.Fatalf("resumed source run: %v", err)
	}
	p.finish(rctx)
	st = nodeStatus{}
	p.fill(&st)
	if st.Status == precopy.StatusPostcopyPaused || st.PostcopyActive || st.PostcopyResumes != 1 {
		t.Errorf("after the resumed run: %+v: want done after one resume", st)
	}
}
