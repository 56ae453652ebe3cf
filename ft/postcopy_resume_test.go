package ft

import (
	"context"
	"errors"
	"io"
	"log/slog"
	"net"
	"strings"
	"testing"
	"time"

	"github.com/tandemvm/tandem/api"
	"github.com/tandemvm/tandem/precopy"
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
		resumed <- p.awaitResume(context.Background(), errors.New("post-copy link failed: read: i/o timeout"))
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
	if err := p.endResume(nil, nil, errors.New("dial: refused")); err == nil || status().Status != precopy.StatusPostcopyPaused {
		t.Errorf("a failed resume: %v, status %s: want the error and still paused", err, status().Status)
	}
	if err := p.beginResume("m1", "postcopy-paused"); err != nil {
		t.Fatal(err)
	}
	u, b := pipe(), pipe()
	if err := p.endResume(u, b, nil); err != nil {
		t.Fatal(err)
	}
	if !<-resumed {
		t.Fatal("the waiting run was not resumed")
	}
	if st := status(); st.Status == precopy.StatusPostcopyPaused || st.PostcopyResumes != 1 || p.urgent != u || p.bulk != b {
		t.Errorf("after the resume: status %s, %d resumes, new connections in place %v", st.Status, st.PostcopyResumes, p.urgent == u && p.bulk == b)
	}
	go func() { resumed <- p.awaitResume(context.Background(), errors.New("lost again")) }()
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
