package kvm

import (
	"errors"
	"testing"

	"github.com/tandemvm/tandem/guest"
)

// The 8250 register model, without KVM: LSR data-ready, RBR, DLAB, IIR.
func TestUARTRegisters(t *testing.T) {
	u := newUART()
	if lsr := u.read(5); lsr&lsrDataReady != 0 || lsr&lsrTHRE == 0 {
		t.Fatalf("idle LSR %#x", lsr)
	}
	if err := u.input([]byte("hi")); err != nil {
		t.Fatal(err)
	}
	if lsr := u.read(5); lsr&lsrDataReady == 0 {
		t.Fatalf("LSR %#x without data ready", lsr)
	}
	if a, b := u.read(0), u.read(0); a != 'h' || b != 'i' {
		t.Fatalf("RBR gave %q %q", a, b)
	}
	if u.read(5)&lsrDataReady != 0 {
		t.Fatal("data ready after the queue drained")
	}
	var out []byte
	u.write(0, []byte("x"), func(p []byte) { out = append(out, p...) })
	u.write(3, []byte{lcrDLAB}, nil)
	u.write(0, []byte{1}, func(p []byte) { out = append(out, p...) }) // divisor, not output
	if u.read(0) != 1 || string(out) != "x" {
		t.Fatalf("DLAB: dll %d, out %q", u.read(0), out)
	}
	u.write(3, []byte{0x03}, nil)
	if iir := u.read(2); iir&0x0f != 0x01 {
		t.Fatalf("IIR %#x with nothing pending", iir)
	}
	u.write(1, []byte{0x01}, nil)
	u.input([]byte("z"))
	if iir := u.read(2); iir&0x0f != 0x04 {
		t.Fatalf("IIR %#x with RX data", iir)
	}
	buf := make([]byte, 8)
	if n := u.readBulk(buf); n != 1 || buf[0] != 'z' {
		t.Fatalf("bulk read %d %q", n, buf[:n])
	}
	if err := u.input(make([]byte, inputCap+1)); err == nil {
		t.Fatal("input beyond the buffer accepted")
	}
	s := u.save()
	v := newUART()
	v.load(s)
	if v.save().LCR != s.LCR || v.save().IER != 1 {
		t.Fatal("UART state did not round-trip")
	}
}

func TestParseImage(t *testing.T) {
	if _, err := parseImage("x", []byte("short")); !errors.Is(err, ErrImage) {
		t.Fatal(err)
	}
	if _, err := New(guest.Config{Memory: 1, VCPUs: 1}); !errors.Is(err, guest.ErrConfig) {
		t.Fatalf("bad config: %v", err)
	}
}

func TestDefaultImageEnv(t *testing.T) {
	t.Setenv(ImageEnv, "/nonexistent/microguest.bin")
	_, err := DefaultImage()
	if !errors.Is(err, ErrImage) {
		t.Fatal(err)
	}
}
