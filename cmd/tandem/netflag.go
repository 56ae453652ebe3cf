package main

import (
	"flag"

	"github.com/tandemvm/tandem/ft"
	"github.com/tandemvm/tandem/internal/tap"
)

// netFlag is --net: the TAP device through which this node's copy of the
// guest's network card talks, once this node runs the guest.
type netFlag struct{ spec string }

func addNetFlag(fs *flag.FlagSet, nf *netFlag) {
	fs.StringVar(&nf.spec, "net", "", "the guest network on this node: tap:NAME[,bridge=BRIDGE] opens (or creates) TAP device NAME, attaches it to the existing Linux bridge BRIDGE and brings it up; the guest's card (--guest-ip, on the node that boots the guest) sends and receives through it while this node runs the guest")
}

// attach opens the device into nc (nothing without --net). A bad value,
// a missing bridge or a missing permission is one line and exit 2,
// before anything starts.
func (nf netFlag) attach(nc ft.NodeConfig) (ft.NodeConfig, error) {
	if nf.spec == "" {
		return nc, nil
	}
	sp, err := tap.ParseSpec(nf.spec)
	if err != nil {
		return nc, usagef("--net %v", err)
	}
	dev, err := tap.Open(sp)
	if err != nil {
		return nc, usagef("--net: %v", err)
	}
	nc.Net = dev
	return nc, nil
}
