package kvm

import (
	"fmt"
	"sync"
)

// inputCap bounds the console input queue; Input fails beyond it.
const inputCap = 64 << 10

// uart is an 8250/16550 register model at 0x3f8 with no interrupt line,
// plus Tandem's bulk extension (ports 0x504/0x505: a whole buffer per exit,
// because an exit costs tens of microseconds on kvm-pvm and string I/O
// exits once per byte there). Both paths share one input queue and one
// sink. Output goes to the console sink synchronously on the vCPU that
// wrote it.
type uart struct {
	// mu guards the registers and the input queue.
	mu         sync.Mutex
	ier        uint8
	lcr        uint8
	mcr        uint8
	scr        uint8
	dll, dlm   uint8
	fcr        uint8
	thrPending bool // THR-empty "interrupt" pending until IIR is read
	in         []byte
}

const (
	lsrDataReady = 0x01
	lsrTHRE      = 0x20
	lsrTEMT      = 0x40
	lcrDLAB      = 0x80
)

func newUART() *uart { return &uart{dll: 12} } // 9600 baud, as firmware leaves it

func (u *uart) hasInput() bool {
	u.mu.Lock()
	defer u.mu.Unlock()
	return len(u.in) > 0
}

// readBulk moves up to len(dst) queued input bytes into dst (Tandem's bulk
// RX port) and returns how many.
func (u *uart) readBulk(dst []byte) int {
	u.mu.Lock()
	defer u.mu.Unlock()
	n := copy(dst, u.in)
	u.in = u.in[n:]
	if len(u.in) == 0 {
		u.in = nil
	}
	return n
}

func (u *uart) input(p []byte) error {
	u.mu.Lock()
	defer u.mu.Unlock()
	if len(u.in)+len(p) > inputCap {
		return fmt.Errorf("kvm: console input buffer full (%d of %d bytes queued)", len(u.in), inputCap)
	}
	u.in = append(u.in, p...)
	return nil
}

// write handles an OUT to register reg; buf holds one or more bytes (a
// string OUT to THR arrives whole and reaches the sink in one call).
func (u *uart) write(reg uint16, buf []byte, sink func([]byte)) {
	u.mu.Lock()
	dlab := u.lcr&lcrDLAB != 0
	if reg == 0 && !dlab {
		u.thrPending = true
		u.mu.Unlock()
		if sink != nil {
			sink(buf)
		}
		return
	}
	defer u.mu.Unlock()
	b := buf[len(buf)-1]
	switch reg {
	case 0:
		u.dll = b
	case 1:
		if dlab {
			u.dlm = b
		} else {
			u.ier = b & 0x0f
			u.thrPending = u.ier&0x02 != 0
		}
	case 2:
		u.fcr = b
		if b&0x02 != 0 { // clear the receive FIFO
			u.in = u.in[:0]
		}
	case 3:
		u.lcr = b
	case 4:
		u.mcr = b & 0x1f
	case 7:
		u.scr = b
	}
}

func (u *uart) read(reg uint16) uint8 {
	u.mu.Lock()
	defer u.mu.Unlock()
	dlab := u.lcr&lcrDLAB != 0
	switch reg {
	case 0:
		if dlab {
			return u.dll
		}
		if len(u.in) == 0 {
			return 0
		}
		b := u.in[0]
		u.in = u.in[1:]
		if len(u.in) == 0 {
			u.in = nil // let the backing array go
		}
		return b
	case 1:
		if dlab {
			return u.dlm
		}
		return u.ier
	case 2:
		fifo := uint8(0)
		if u.fcr&0x01 != 0 {
			fifo = 0xc0
		}
		switch {
		case u.ier&0x01 != 0 && len(u.in) > 0:
			return fifo | 0x04
		case u.ier&0x02 != 0 && u.thrPending:
			u.thrPending = false
			return fifo | 0x02
		}
		return fifo | 0x01
	case 3:
		return u.lcr
	case 4:
		return u.mcr
	case 5:
		lsr := uint8(lsrTHRE | lsrTEMT)
		if len(u.in) > 0 {
			lsr |= lsrDataReady
		}
		return lsr
	case 6:
		if u.mcr&0x10 != 0 { // loopback: reflect MCR outputs
			return (u.mcr&0x0f)<<4 | 0
		}
		return 0xb0 // DCD, DSR, CTS
	case 7:
		return u.scr
	}
	return 0xff
}

// uartStateV1 is the saved UART.
type uartStateV1 struct {
	IER, LCR, MCR, SCR, DLL, DLM, FCR uint8
	THRPending                        bool
	Input                             []byte
}

func (u *uart) save() uartStateV1 {
	u.mu.Lock()
	defer u.mu.Unlock()
	return uartStateV1{IER: u.ier, LCR: u.lcr, MCR: u.mcr, SCR: u.scr, DLL: u.dll, DLM: u.dlm, FCR: u.fcr,
		THRPending: u.thrPending, Input: append([]byte(nil), u.in...)}
}

func (u *uart) load(s uartStateV1) {
	u.mu.Lock()
	defer u.mu.Unlock()
	u.ier, u.lcr, u.mcr, u.scr, u.dll, u.dlm, u.fcr = s.IER, s.LCR, s.MCR, s.SCR, s.DLL, s.DLM, s.FCR
	u.thrPending = s.THRPending
	u.in = append([]byte(nil), s.Input...)
}

// console is the guest.Console of a Guest.
type console struct{ g *Guest }

// sink is the current output sink, or nil to discard.
func (c console) sink() func([]byte) {
	if p := c.g.sink.Load(); p != nil {
		return *p
	}
	return nil
}

// Input implements guest.Console.
func (c console) Input(p []byte) error {
	if err := c.g.uart.input(p); err != nil {
		return err
	}
	v := c.g.vcpus[0]
	select {
	case v.wake <- struct{}{}:
	default:
	}
	return nil
}

// SetOutput implements guest.Console.
func (c console) SetOutput(sink func(p []byte)) {
	if sink == nil {
		c.g.sink.Store(nil)
		return
	}
	c.g.sink.Store(&sink)
}
