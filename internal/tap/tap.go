// Package tap opens the host side of a guest's network: a Linux TAP
// device, optionally attached to a bridge, read and written one Ethernet
// frame at a time with deadlines.
//
// It owns the device's file descriptor and the ioctls that create it,
// bring it up and put it in a bridge. It must never parse frames (that is
// guest/netframe) or decide when a frame may leave (the output gate);
// every read and write takes a deadline, so nothing here waits forever.
package tap

import (
	"errors"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"strings"
	"time"

	"golang.org/x/sys/unix"
)

// Spec is a parsed --net value: tap:NAME[,bridge=BRIDGE].
type Spec struct {
	Name   string
	Bridge string // "": leave the device outside any bridge
}

// ParseSpec parses a --net value.
func ParseSpec(s string) (Spec, error) {
	rest, ok := strings.CutPrefix(s, "tap:")
	if !ok {
		return Spec{}, fmt.Errorf("%q: want tap:NAME[,bridge=BRIDGE]", s)
	}
	name, opts, _ := strings.Cut(rest, ",")
	sp := Spec{Name: name}
	if err := checkName(name); err != nil {
		return Spec{}, fmt.Errorf("%q: device %w", s, err)
	}
	if opts != "" {
		br, ok := strings.CutPrefix(opts, "bridge=")
		if !ok || strings.Contains(br, ",") {
			return Spec{}, fmt.Errorf("%q: want tap:NAME[,bridge=BRIDGE]", s)
		}
		if err := checkName(br); err != nil {
			return Spec{}, fmt.Errorf("%q: bridge %w", s, err)
		}
		sp.Bridge = br
	}
	return sp, nil
}

// checkName is the kernel's rule for an interface name: 1 to 15 bytes,
// no '/', no whitespace, not "." or "..".
func checkName(n string) error {
	if n == "" || len(n) > unix.IFNAMSIZ-1 || n == "." || n == ".." || strings.ContainsAny(n, "/: \t\n") {
		return fmt.Errorf("name %q: want 1 to %d characters without '/', ':' or spaces", n, unix.IFNAMSIZ-1)
	}
	return nil
}

// Device is an open TAP device.
type Device struct {
	f    *os.File
	spec Spec
}

// Open opens (creating it if it does not exist) the TAP device sp.Name
// without packet information headers, attaches it to sp.Bridge if given
// (which must exist) and brings it up. The device lives while it is open
// (it is not made persistent).
func Open(sp Spec) (*Device, error) {
	if err := checkName(sp.Name); err != nil {
		return nil, err
	}
	if sp.Bridge != "" {
		if _, err := net.InterfaceByName(sp.Bridge); err != nil {
			return nil, fmt.Errorf("bridge %s does not exist (make it with: ip link add %s type bridge)", sp.Bridge, sp.Bridge)
		}
		if _, err := os.Stat("/sys/class/net/" + sp.Bridge + "/bridge"); err != nil {
			return nil, fmt.Errorf("%s is not a bridge", sp.Bridge)
		}
	}
	fd, err := unix.Open("/dev/net/tun", unix.O_RDWR|unix.O_NONBLOCK|unix.O_CLOEXEC, 0)
	if err != nil {
		return nil, fmt.Errorf("tap %s: open /dev/net/tun: %w", sp.Name, err)
	}
	ifr, err := unix.NewIfreq(sp.Name)
	if err != nil {
		unix.Close(fd)
		return nil, fmt.Errorf("tap %s: %w", sp.Name, err)
	}
	ifr.SetUint16(unix.IFF_TAP | unix.IFF_NO_PI)
	if err := unix.IoctlIfreq(fd, unix.TUNSETIFF, ifr); err != nil {
		unix.Close(fd)
		if errors.Is(err, unix.EPERM) {
			return nil, fmt.Errorf("tap %s: permission denied (needs CAP_NET_ADMIN, or a device made for this user with ip tuntap add)", sp.Name)
		}
		return nil, fmt.Errorf("tap %s: TUNSETIFF: %w", sp.Name, err)
	}
	d := &Device{f: os.NewFile(uintptr(fd), "tap:"+sp.Name), spec: sp}
	if err := d.setup(); err != nil {
		d.Close()
		return nil, err
	}
	return d, nil
}

// setup attaches the device to its bridge and brings it up, through an
// ioctl socket.
func (d *Device) setup() error {
	s, err := unix.Socket(unix.AF_INET, unix.SOCK_DGRAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		return fmt.Errorf("tap %s: %w", d.spec.Name, err)
	}
	defer unix.Close(s)
	if d.spec.Bridge != "" {
		ifc, err := net.InterfaceByName(d.spec.Name)
		if err != nil {
			return fmt.Errorf("tap %s: %w", d.spec.Name, err)
		}
		br, err := unix.NewIfreq(d.spec.Bridge)
		if err != nil {
			return fmt.Errorf("bridge %s: %w", d.spec.Bridge, err)
		}
		br.SetUint32(uint32(ifc.Index))
		if err := unix.IoctlIfreq(s, unix.SIOCBRADDIF, br); err != nil {
			// EBUSY: the device is in a bridge already, which is fine
			// only if it is this one.
			master, _ := os.Readlink("/sys/class/net/" + d.spec.Name + "/master")
			if !errors.Is(err, unix.EBUSY) || filepath.Base(master) != d.spec.Bridge {
				return fmt.Errorf("tap %s: attach to bridge %s: %w", d.spec.Name, d.spec.Bridge, err)
			}
		}
	}
	ifr, err := unix.NewIfreq(d.spec.Name)
	if err != nil {
		return err
	}
	if err := unix.IoctlIfreq(s, unix.SIOCGIFFLAGS, ifr); err != nil {
		return fmt.Errorf("tap %s: get flags: %w", d.spec.Name, err)
	}
	ifr.SetUint16(ifr.Uint16() | unix.IFF_UP)
	if err := unix.IoctlIfreq(s, unix.SIOCSIFFLAGS, ifr); err != nil {
		return fmt.Errorf("tap %s: bring up: %w", d.spec.Name, err)
	}
	return nil
}

// Name is the device's interface name.
func (d *Device) Name() string { return d.spec.Name }

// ErrTimeout is ReadFrame's and WriteFrame's error when the deadline
// passes first.
var ErrTimeout = os.ErrDeadlineExceeded

// ReadFrame reads one frame into buf (which should hold 1514 bytes or
// more; a longer frame is cut) before deadline.
func (d *Device) ReadFrame(buf []byte, deadline time.Time) (int, error) {
	if err := d.f.SetReadDeadline(deadline); err != nil {
		return 0, err
	}
	return d.f.Read(buf)
}

// WriteFrame writes one frame before deadline.
func (d *Device) WriteFrame(frame []byte, deadline time.Time) error {
	if err := d.f.SetWriteDeadline(deadline); err != nil {
		return err
	}
	_, err := d.f.Write(frame)
	return err
}

// Close closes the device; a device Open created disappears with it.
func (d *Device) Close() error { return d.f.Close() }
