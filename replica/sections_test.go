package replica

import (
	"bufio"
	"context"
	"maps"
	"net"
	"strings"
	"testing"
	"time"

	"github.com/tandemvm/tandem/guest"
	"github.com/tandemvm/tandem/guest/synth"
)

// sectionGuests are a synth guest with a network card (its state carries
// synth-nic) and one without, with their Hellos as a sender makes them.
func sectionGuests(t *testing.T) (withCard, without guest.Guest, helloCard, helloPlain Hello) {
	t.Helper()
	plain := guest.Config{Memory: 4 << 20, VCPUs: 1, Workload: guest.Workload{Kind: guest.WorkloadKV}}
	card := plain
	card.Net.IP = "10.77.0.10/24"
	var err error
	if withCard, err = synth.New(card); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { withCard.Close() })
	if without, err = synth.New(plain); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { without.Close() })
	helloCard = Hello{Purpose: PurposeReplicate, Kind: synth.Kind, Config: card, Build: "new", Devices: guest.StateSectionsOf(withCard)}
	helloPlain = Hello{Purpose: PurposeReplicate, Kind: synth.Kind, Config: plain, Build: "new", Devices: guest.StateSectionsOf(without)}
	if _, ok := helloCard.Devices["synth-nic"]; !ok {
		t.Fatalf("a guest with a card lists %v, no synth-nic", helloCard.Devices)
	}
	if _, ok := helloPlain.Devices["synth-nic"]; ok {
		t.Fatalf("a guest without a card lists %v, with synth-nic", helloPlain.Devices)
	}
	return withCard, without, helloCard, helloPlain
}

func dialSections(addr string, h Hello, g guest.Guest) (*Link, error) {
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	return Dial(ctx, addr, h, g.Regions(), DialOptions{Timeout: 5 * time.Second})
}

// A receiver that does not load a section the sender's guest carries
// (here: this build with synth-nic taken out of its known set, as a
// build that knows section checks but not the card would be) refuses in
// one line naming the section and the versions, before any stream; a
// guest without the card still streams to it. A section at another
// version is refused the same way.
func TestReceiverRefusesUnknownDeviceSection(t *testing.T) {
	withCard, without, helloCard, helloPlain := sectionGuests(t)
	noCard := func(kind string) (map[string]uint32, bool) {
		m := maps.Clone(synth.StateVersions())
		delete(m, "synth-nic")
		return m, kind == synth.Kind
	}
	sec := NewSecondary(&Receiver{NewGuest: synthFactory, Build: "no-card", Sections: noCard}, nil)
	defer sec.Close()
	addr, done := serveOnce(t, sec)
	_, err := dialSections(addr, helloCard, withCard)
	if err == nil || !strings.Contains(err.Error(), `device section "synth-nic" (version 1)`) ||
		!strings.Contains(err.Error(), "no-card") || !strings.Contains(err.Error(), "synth-vcpu 1") || strings.Contains(err.Error(), "\n") {
		t.Fatalf("Dial with a card: %v, want a one-line refusal naming synth-nic, its version and the receiver's sections", err)
	}
	t.Logf("refused: %v", err)
	if serr := waitServe(t, done, 5*time.Second); serr == nil || !strings.Contains(serr.Error(), "synth-nic") {
		t.Fatalf("the receiver's Serve: %v", serr)
	}

	addr, done = serveOnce(t, sec)
	l, err := dialSections(addr, helloPlain, without)
	if err != nil {
		t.Fatalf("a guest without a card refused by a receiver without synth-nic: %v", err)
	}
	l.Close()
	waitServe(t, done, 5*time.Second)

	newer := helloCard
	newer.Devices = maps.Clone(helloCard.Devices)
	newer.Devices["synth-nic"] = 2
	sec2 := NewSecondary(&Receiver{NewGuest: synthFactory, Build: "this"}, nil)
	defer sec2.Close()
	addr, done = serveOnce(t, sec2)
	if _, err := dialSections(addr, newer, withCard); err == nil || !strings.Contains(err.Error(), `"synth-nic" version 2; this build (this) loads version 1`) {
		t.Fatalf("Dial with synth-nic version 2: %v", err)
	}
	waitServe(t, done, 5*time.Second)
}

// oldReceiver answers one Hello as a build before section checks does:
// OK, with no sections_checked (it ignores the Hello's devices), and
// returns the Hello it read.
func oldReceiver(t *testing.T) (string, <-chan Hello) {
	t.Helper()
	return fakeReceiver(t, `{"ok":true,"build":"tandem/old"}`)
}

// fakeReceiver answers one Hello with reply (a JSON line) and reports
// the Hello it read.
func fakeReceiver(t *testing.T, reply string) (string, <-chan Hello) {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ln.Close() })
	got := make(chan Hello, 1)
	go func() {
		c, err := ln.Accept()
		if err != nil {
			close(got)
			return
		}
		defer c.Close()
		c.SetDeadline(time.Now().Add(5 * time.Second))
		br := bufio.NewReader(c)
		var h Hello
		readLine(br, &h)
		c.Write([]byte(reply + "\n"))
		got <- h
		br.ReadByte() // until the sender closes or sends its stream
	}()
	return ln.Addr().String(), got
}

// A receiver older than section checks says nothing about them: the
// sender itself refuses to stream it a guest whose state carries a
// section that build cannot know (synth-nic), in one line naming it,
// and streams a guest without the card as before.
func TestSenderRefusesReceiverPredatingSectionChecks(t *testing.T) {
	withCard, without, helloCard, helloPlain := sectionGuests(t)
	addr, got := oldReceiver(t)
	_, err := dialSections(addr, helloCard, withCard)
	if err == nil || !strings.Contains(err.Error(), `"synth-nic" (version 1)`) || !strings.Contains(err.Error(), "tandem/old") ||
		!strings.Contains(err.Error(), "does not check device sections") || strings.Contains(err.Error(), "\n") {
		t.Fatalf("Dial with a card to an old receiver: %v, want a one-line refusal naming synth-nic", err)
	}
	t.Logf("refused: %v", err)
	if h := <-got; h.Devices["synth-nic"] != 1 {
		t.Fatalf("the Hello listed %v", h.Devices)
	}

	addr, got = oldReceiver(t)
	l, err := dialSections(addr, helloPlain, without)
	if err != nil {
		t.Fatalf("a guest without a card refused for an old receiver: %v", err)
	}
	l.Close()
	<-got
}

// A peer's strings quoted in a refusal (its build, its error) cannot
// break the refusal's one line, whatever they hold.
func TestRefusalQuotesPeerOnOneLine(t *testing.T) {
	withCard, _, helloCard, _ := sectionGuests(t)
	for _, reply := range []string{
		`{"ok":true,"build":"tandem/old\nforged: second line"}`,
		`{"ok":false,"error":"no\nforged: second line\u001b[2J","build":"x"}`,
	} {
		addr, got := fakeReceiver(t, reply)
		_, err := dialSections(addr, helloCard, withCard)
		if err == nil || strings.ContainsAny(err.Error(), "\n\x1b") || !strings.Contains(err.Error(), "forged") {
			t.Fatalf("reply %s: %q, want a one-line refusal quoting the peer", reply, err)
		}
		t.Logf("refused: %v", err)
		<-got
	}
}
