package ft

import (
	"crypto/tls"
	"net"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/tandemvm/tandem/internal/trust"
	"github.com/tandemvm/tandem/replica"
)

// tlsChannel is a destination's end of a mutual-TLS loopback pair whose
// client holds the certificate client (of the CA in dir), and the
// client's end.
func tlsChannel(t *testing.T, dir, client string) (dst, src net.Conn) {
	t.Helper()
	load := func(name string) *trust.Identity {
		id, err := trust.Load(trust.Config{CAFile: filepath.Join(dir, trust.CAFile),
			CertFile: filepath.Join(dir, trust.CertFile(name)), KeyFile: filepath.Join(dir, trust.KeyFile(name))})
		if err != nil {
			t.Fatal(err)
		}
		return id
	}
	c, s := tcpPair(t)
	srv, cli := tls.Server(s, load("dst").ServerTLS()), tls.Client(c, load(client).ClientTLS("dst"))
	errs := make(chan error, 1)
	go func() { errs <- cli.Handshake() }()
	srv.SetDeadline(time.Now().Add(10 * time.Second))
	if err := srv.Handshake(); err != nil {
		t.Fatal(err)
	}
	if err := <-errs; err != nil {
		t.Fatal(err)
	}
	srv.SetDeadline(time.Time{})
	return srv, cli
}

// A resume's channels must come from the identity that opened the
// migration's: the migration id alone, which status publishes during
// the outage, does not let another holder of the CA's certificates take
// the run over. The source's own certificate still resumes it.
func TestPostcopyResumeBoundToSourceIdentity(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "pki")
	if err := trust.NewCA(dir, "resume test CA", time.Now()); err != nil {
		t.Fatal(err)
	}
	for _, n := range []string{"dst", "src", "intruder"} {
		if err := trust.Issue(dir, n, trust.IssueOptions{IPs: []net.IP{net.IPv4(127, 0, 0, 1)}, DNS: []string{n}}, time.Now()); err != nil {
			t.Fatal(err)
		}
	}
	p, tg := lostTarget(t)
	p.conns, p.arrived = map[string]net.Conn{}, make(chan struct{})
	var srcEnds []net.Conn
	for _, ch := range []string{replica.ChannelUrgent, replica.ChannelBulk} {
		dst, src := tlsChannel(t, dir, "src")
		srcEnds = append(srcEnds, src)
		if err := p.take(replica.Hello{MigrationID: lostID, Channel: ch}, dst); err != nil {
			t.Fatal(err)
		}
	}
	p.run(tg, lostID)
	defer p.abort()
	for _, c := range srcEnds {
		c.Close() // the link is lost
	}
	for deadline := time.Now().Add(10 * time.Second); ; time.Sleep(time.Millisecond) {
		p.mu.Lock()
		waiting := p.waiting != nil
		p.mu.Unlock()
		if waiting {
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("the run did not wait for a resume")
		}
	}
	resume := func(ch, who string) error {
		dst, _ := tlsChannel(t, dir, who)
		return p.take(replica.Hello{MigrationID: lostID, Channel: ch, Resume: true}, dst)
	}
	if err := resume(replica.ChannelUrgent, "intruder"); err == nil || !strings.Contains(err.Error(), `came from "intruder", the migration's source is "src"`) {
		t.Errorf("a resume from another identity: %v, want refused naming both", err)
	}
	for _, ch := range []string{replica.ChannelUrgent, replica.ChannelBulk} {
		if err := resume(ch, "src"); err != nil {
			t.Fatalf("the source's own resume: %v", err)
		}
	}
	p.mu.Lock()
	waiting := p.waiting != nil
	p.mu.Unlock()
	if waiting {
		t.Error("the source's resume did not wake the run")
	}
}

// The migration's two channels come from one source: a second channel
// from another certificate of the same CA is refused naming both, and
// the source's own is still taken.
func TestPostcopyChannelsFromOneIdentity(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "pki")
	if err := trust.NewCA(dir, "channel test CA", time.Now()); err != nil {
		t.Fatal(err)
	}
	for _, n := range []string{"dst", "src", "intruder"} {
		if err := trust.Issue(dir, n, trust.IssueOptions{IPs: []net.IP{net.IPv4(127, 0, 0, 1)}, DNS: []string{n}}, time.Now()); err != nil {
			t.Fatal(err)
		}
	}
	p, _ := lostTarget(t)
	p.conns, p.arrived = map[string]net.Conn{}, make(chan struct{})
	first, _ := tlsChannel(t, dir, "src")
	if err := p.take(replica.Hello{MigrationID: lostID, Channel: replica.ChannelUrgent}, first); err != nil {
		t.Fatal(err)
	}
	other, _ := tlsChannel(t, dir, "intruder")
	if err := p.take(replica.Hello{MigrationID: lostID, Channel: replica.ChannelBulk}, other); err == nil || !strings.Contains(err.Error(), `comes from "intruder", not "src"`) {
		t.Errorf("a bulk channel from another identity: %v, want refused naming both", err)
	}
	own, _ := tlsChannel(t, dir, "src")
	if err := p.take(replica.Hello{MigrationID: lostID, Channel: replica.ChannelBulk}, own); err != nil {
		t.Errorf("the source's own bulk channel: %v", err)
	}
	for _, c := range p.conns {
		c.Close()
	}
}
