package replica

import (
	"context"
	"errors"
	"fmt"
	"net"
	"strings"
	"testing"
	"time"

	"github.com/tandemvm/tandem/guest"
)

// serveOne accepts one connection on ln and runs ReceiveMigrationWith on
// it with r and o; the result comes on the channel.
func serveOne(t *testing.T, ln net.Listener, r *Receiver, o MigrationOptions) <-chan MigrationResult {
	t.Helper()
	out := make(chan MigrationResult, 1)
	go func() {
		conn, err := ln.Accept()
		if err != nil {
			out <- MigrationResult{}
			return
		}
		res, _ := r.ReceiveMigrationWith(context.Background(), conn, o)
		if !res.PostcopyChannel {
			conn.Close()
		}
		out <- res
	}()
	return out
}

// A post-copy channel is taken only for the migration the receiver's
// PostcopyConn names, and refused in one line with both ids otherwise;
// a receiver without PostcopyConn refuses every one.
func TestPostcopyChannelTiedToMigration(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	var taken net.Conn
	r := &Receiver{NewGuest: synthFactory, Build: "test", PostcopyConn: func(h Hello, conn net.Conn) error {
		if h.MigrationID == "gone" {
			return fmt.Errorf("migration gone was abandoned here: %w", ErrPostcopyGone)
		}
		if h.MigrationID != "m1" {
			return errors.New("no post-copy migration " + h.MigrationID + " here (receiving m1)")
		}
		if conn != nil {
			taken = conn
		}
		return nil
	}}
	dial := func(id, ch string) (net.Conn, error) {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		return DialPostcopy(ctx, ln.Addr().String(), id, ch, DialOptions{})
	}
	done := serveOne(t, ln, r, MigrationOptions{})
	_, err = dial("m2", ChannelUrgent)
	if err == nil || !strings.Contains(err.Error(), "m2") || !strings.Contains(err.Error(), "m1") {
		t.Errorf("wrong migration: %v, want a refusal naming m2 and m1", err)
	}
	if res := <-done; res.PostcopyChannel {
		t.Errorf("a refused channel was handed over")
	}
	if errors.Is(err, ErrPostcopyGone) {
		t.Errorf("a plain refusal reads as the migration gone: %v", err)
	}
	// A receiver that no longer holds the migration says so on the
	// wire: the dialer's error wraps ErrPostcopyGone (the source then
	// stops waiting for a resume).
	done = serveOne(t, ln, r, MigrationOptions{})
	if _, err := ResumePostcopy(context.Background(), ln.Addr().String(), "gone", ChannelUrgent, DialOptions{}); !errors.Is(err, ErrPostcopyGone) || !strings.Contains(err.Error(), "abandoned here") {
		t.Errorf("resume of a migration the receiver gave up: %v, want ErrPostcopyGone with its reason", err)
	}
	<-done
	done = serveOne(t, ln, r, MigrationOptions{})
	if _, err := dial("m1", "sideways"); err == nil || !strings.Contains(err.Error(), "sideways") {
		t.Errorf("bad channel name: %v, want a refusal naming it", err)
	}
	<-done
	done = serveOne(t, ln, r, MigrationOptions{})
	c, err := dial("m1", ChannelBulk)
	if err != nil {
		t.Fatalf("right migration: %v", err)
	}
	defer c.Close()
	if res := <-done; !res.PostcopyChannel || taken == nil {
		t.Fatalf("the channel was not handed over (%+v)", res)
	}
	defer taken.Close()
	// Bytes go through untouched after the handshake.
	if _, err := c.Write([]byte("M")); err != nil {
		t.Fatal(err)
	}
	var b [1]byte
	taken.SetReadDeadline(time.Now().Add(5 * time.Second))
	if _, err := taken.Read(b[:]); err != nil || b[0] != 'M' {
		t.Fatalf("read after the handshake: %q %v", b, err)
	}
	r.PostcopyConn = nil
	done = serveOne(t, ln, r, MigrationOptions{})
	if _, err := dial("m1", ChannelUrgent); err == nil || !strings.Contains(err.Error(), "no post-copy") {
		t.Errorf("receiver without post-copy: %v, want a refusal", err)
	}
	<-done
}

// A Hello asking for post-copy learns the receiver's answer in its
// handshake: granted where MigrationOptions.Postcopy says yes, refused
// with its one line otherwise, and refused without the two-phase
// switch-over.
func TestPostcopyGrantedInHandshake(t *testing.T) {
	cases := []struct {
		name    string
		commit  bool
		answer  error
		granted bool
		why     string
	}{
		{"granted", true, nil, true, ""},
		{"refused", true, errors.New("userfaultfd: not permitted"), false, "not permitted"},
		{"one-phase", false, nil, false, "two-phase"},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			ln, err := net.Listen("tcp", "127.0.0.1:0")
			if err != nil {
				t.Fatal(err)
			}
			defer ln.Close()
			r := &Receiver{NewGuest: synthFactory, Build: "test"}
			done := serveOne(t, ln, r, MigrationOptions{Postcopy: func(guest.Guest, Hello) error { return c.answer }})
			cfg := guest.Config{Memory: 16 << 20, VCPUs: 1, Workload: guest.Workload{Kind: guest.WorkloadKV}}
			g, err := synthFactory("synth", cfg)
			if err != nil {
				t.Fatal(err)
			}
			defer g.Close()
			h := Hello{Purpose: PurposeMigrate, Kind: "synth", Config: cfg, Build: "test", Postcopy: true, Commit: c.commit, MigrationID: "m1"}
			ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
			defer cancel()
			l, err := Dial(ctx, ln.Addr().String(), h, g.Regions(), DialOptions{})
			if err != nil {
				t.Fatal(err)
			}
			granted, why := l.Postcopy()
			l.Close()
			<-done
			if granted != c.granted || !strings.Contains(why, c.why) {
				t.Errorf("Postcopy() = %v, %q; want %v and a reason with %q", granted, why, c.granted, c.why)
			}
		})
	}
}

// ResumePostcopy's Hello says it resumes (DialPostcopy's does not), so
// the receiver can take it only for a migration whose link is down; the
// receiver's refusal comes back in one line.
func TestPostcopyResumeHello(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	var resumes []bool
	r := &Receiver{NewGuest: synthFactory, Build: "test", PostcopyConn: func(h Hello, conn net.Conn) error {
		if conn == nil {
			resumes = append(resumes, h.Resume)
		}
		if h.Resume && h.MigrationID != "m1" {
			return errors.New("this destination holds post-copy migration \"m1\"; asked to resume \"" + h.MigrationID + "\"")
		}
		if conn != nil {
			conn.Close()
		}
		return nil
	}}
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	for _, c := range []struct {
		dial func(context.Context, string, string, string, DialOptions) (net.Conn, error)
		id   string
		ok   bool
	}{{DialPostcopy, "m1", true}, {ResumePostcopy, "m1", true}, {ResumePostcopy, "m2", false}} {
		done := serveOne(t, ln, r, MigrationOptions{})
		conn, err := c.dial(ctx, ln.Addr().String(), c.id, ChannelUrgent, DialOptions{})
		if conn != nil {
			conn.Close()
		}
		<-done
		if (err == nil) != c.ok || (err != nil && (!strings.Contains(err.Error(), "m1") || !strings.Contains(err.Error(), "m2"))) {
			t.Errorf("%s: %v (want ok %v; a refusal names both ids)", c.id, err, c.ok)
		}
	}
	if len(resumes) != 3 || resumes[0] || !resumes[1] || !resumes[2] {
		t.Errorf("the receiver saw resume flags %v, want [false true true]", resumes)
	}
}
