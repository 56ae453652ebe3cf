package kvm

import (
	"encoding/binary"

	"github.com/tandemvm/tandem/internal/timing"
)

// Exit handlers, as tandem_vcpu_exit_seconds names them. The index is the
// position in exitHandlers.
const (
	hUARTOut = iota
	hUARTIn
	hConsTx
	hConsRx
	hIdle
	hProgress
	hDiskSubmit
	hDiskDone
	hNetTx
	hException
	hPanic
	hPortOther
	hHLT
	hShutdown
	hMMIO
	hIntr
	hDirtyRing
	hOther
)

var exitHandlers = []timing.Handler{
	hUARTOut:    {Reason: "io", Name: "uart.out"},
	hUARTIn:     {Reason: "io", Name: "uart.in"},
	hConsTx:     {Reason: "io", Name: "console.bulk-tx"},
	hConsRx:     {Reason: "io", Name: "console.bulk-rx"},
	hIdle:       {Reason: "io", Name: "idle", Waits: true},
	hProgress:   {Reason: "io", Name: "progress"},
	hDiskSubmit: {Reason: "io", Name: "disk.submit"},
	hDiskDone:   {Reason: "io", Name: "disk.done"},
	hNetTx:      {Reason: "io", Name: "net.tx"},
	hException:  {Reason: "io", Name: "exception"},
	hPanic:      {Reason: "io", Name: "panic"},
	hPortOther:  {Reason: "io", Name: "port.other"},
	hHLT:        {Reason: "hlt"},
	hShutdown:   {Reason: "shutdown"},
	hMMIO:       {Reason: "mmio"},
	hIntr:       {Reason: "intr"},
	hDirtyRing:  {Reason: "dirty-ring-full"},
	hOther:      {Reason: "other"},
}

// TimeExits starts timing every vCPU exit by handler, with slow ones
// (over rec's threshold) in rec's slow list, and returns the table (a
// Prometheus collector the caller registers). Calling it again replaces
// the table. Safe while the guest runs.
func (g *Guest) TimeExits(rec *timing.Recorder) *timing.Exits {
	e := timing.NewExits(exitHandlers, len(g.vcpus), rec)
	g.exitTimes.Store(e)
	return e
}

// exitHandler names the exit in v.run, before it is served.
func (v *vcpu) exitHandler() int {
	d := v.run[runExitData:]
	switch binary.LittleEndian.Uint32(v.run[runExitReason:]) {
	case exitIO:
		out := d[0] == 1
		return portHandler(binary.LittleEndian.Uint16(d[2:]), out)
	case exitHLT:
		return hHLT
	case exitShutdown:
		return hShutdown
	case exitMMIO:
		return hMMIO
	case exitIntr:
		return hIntr
	case exitDirtyRingFull:
		return hDirtyRing
	}
	return hOther
}

func portHandler(port uint16, out bool) int {
	switch {
	case port >= portUART && port < portUART+8:
		if out {
			return hUARTOut
		}
		return hUARTIn
	case port == portConsTx:
		return hConsTx
	case port == portConsRx:
		return hConsRx
	case port == portIdle:
		return hIdle
	case port == portProgress:
		return hProgress
	case port == portDiskSubmit:
		return hDiskSubmit
	case port == portDiskDone:
		return hDiskDone
	case port == portNetTx:
		return hNetTx
	case port == portExc:
		return hException
	case port == portPanic:
		return hPanic
	}
	return hPortOther
}
