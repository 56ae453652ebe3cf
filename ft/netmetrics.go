package ft

import (
	"sync"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/tandemvm/tandem/failover"
	"github.com/tandemvm/tandem/guest"
	"github.com/tandemvm/tandem/guest/netframe"
)

// netMetrics exports the guest network's figures, the same ones status's
// net object shows (docs/NETWORK.md lists them):
//
//	tandem_net_tap_frames_total{dir}               this node's TAP device: received, delivered, sent
//	tandem_net_tap_frames_dropped_total{reason}    queue_full, write_failed
//	tandem_net_announcements_total                 gratuitous ARPs queued
//	tandem_net_card_frames_total{what}             the card: received, arp_replies, datagrams, sent
//	tandem_net_card_frames_dropped_total{reason}   the card's drops (netframe's reasons, queue_full)
//	tandem_net_frames_held, tandem_net_frames_held_bytes    frames the output gate holds now
//	tandem_net_frames_released_total                        frames the output gate let out
//	tandem_net_gate_frames_dropped_total                    frames refused over the gate's 16 MiB bound
//
// and two histograms the epoch loop's gate feeds (outputMetrics). Series
// of the device appear with --net, the card's while this node runs a
// guest with one, the gate's once a loop protected such a guest here.
//
// The card's counts are the card's own, part of the guest's state (as
// status shows them): after a failover they go on from the old primary's
// committed figures. The gate's are this process's: each new epoch loop
// (after a promotion) starts its own at 0, added to the earlier loops'.
type netMetrics struct {
	n *Node

	// mu guards the gate's counts across loops.
	mu              sync.Mutex
	loop            *failover.EpochLoop
	gateSeen        bool
	released, dropd accumulator
}

// outputMetrics are the output gate's histograms: a loop's gate observes
// into them (failover.OutputObserver), so they live as long as the node.
type outputMetrics struct {
	delay       *prometheus.HistogramVec
	epochFrames prometheus.Histogram
}

func newOutputMetrics(reg prometheus.Registerer) *outputMetrics {
	om := &outputMetrics{
		delay: prometheus.NewHistogramVec(prometheus.HistogramOpts{
			Name: "tandem_output_delay_seconds",
			Help: "how long output the guest wrote waited in a protected primary's output gate for its epoch's acknowledgement, from written to released, by kind (frame: a network frame; console: console bytes)",
			// From a pipelined 2 ms epoch to an acknowledgement stalled
			// for seconds.
			Buckets: []float64{250e-6, 500e-6, 1e-3, 2e-3, 5e-3, 10e-3, 20e-3, 50e-3, 100e-3, 250e-3, 500e-3, 1, 2.5, 10},
		}, []string{"kind"}),
		epochFrames: prometheus.NewHistogram(prometheus.HistogramOpts{
			Name:    "tandem_net_epoch_frames",
			Help:    "network frames each released epoch held (epochs that held none are not counted)",
			Buckets: []float64{1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 4096},
		}),
	}
	reg.MustRegister(om.delay, om.epochFrames)
	return om
}

// observer is what an epoch loop's gate tells.
func (om *outputMetrics) observer() failover.OutputObserver {
	frame, console := om.delay.WithLabelValues("frame"), om.delay.WithLabelValues("console")
	return failover.OutputObserver{
		Delay: func(isFrame bool, d time.Duration) {
			if isFrame {
				frame.Observe(d.Seconds())
			} else {
				console.Observe(d.Seconds())
			}
		},
		EpochFrames: func(frames int) { om.epochFrames.Observe(float64(frames)) },
	}
}

var (
	descTapFrames     = prometheus.NewDesc("tandem_net_tap_frames_total", "frames of this node's TAP device (--net): read from the network (dir=received), handed to the guest's card (delivered), written to the network (sent)", []string{"dir"}, nil)
	descTapDropped    = prometheus.NewDesc("tandem_net_tap_frames_dropped_total", "frames to send this node dropped: its queue to the TAP writer was full (reason=queue_full) or the device's write failed or took over 100 ms (write_failed)", []string{"reason"}, nil)
	descAnnouncements = prometheus.NewDesc("tandem_net_announcements_total", "gratuitous ARPs for the guest's address this node queued (five each time it starts running the guest)", nil, nil)
	descCardFrames    = prometheus.NewDesc("tandem_net_card_frames_total", "the guest card's own counts (part of the guest's state): frames it took in (what=received), ARP requests it answered (arp_replies), datagrams it served (datagrams), frames it built (sent)", []string{"what"}, nil)
	descCardDropped   = prometheus.NewDesc("tandem_net_card_frames_dropped_total", "frames the guest's card dropped, by reason: short, too_long, bad_length, bad_checksum, fragment, unsupported, not_ours (its stack), queue_full (its receive queue)", []string{"reason"}, nil)
	descFramesHeld    = prometheus.NewDesc("tandem_net_frames_held", "network frames a protected primary's output gate holds now for epochs not yet acknowledged", nil, nil)
	descFramesHeldB   = prometheus.NewDesc("tandem_net_frames_held_bytes", "the bytes of those frames (bounded at 16 MiB)", nil, nil)
	descFramesRel     = prometheus.NewDesc("tandem_net_frames_released_total", "network frames this node's output gates let out: after their epoch's acknowledgement, or at once while the guest was unprotected", nil, nil)
	descGateDropped   = prometheus.NewDesc("tandem_net_gate_frames_dropped_total", "network frames an output gate refused because 16 MiB of frames already waited for their epochs", nil, nil)
)

// Describe implements prometheus.Collector.
func (nm *netMetrics) Describe(ch chan<- *prometheus.Desc) {
	for _, d := range []*prometheus.Desc{descTapFrames, descTapDropped, descAnnouncements, descCardFrames, descCardDropped,
		descFramesHeld, descFramesHeldB, descFramesRel, descGateDropped} {
		ch <- d
	}
}

// Collect implements prometheus.Collector.
func (nm *netMetrics) Collect(ch chan<- prometheus.Metric) {
	n := nm.n
	n.mu.Lock()
	p, loop := n.net, n.epochs
	var nic guest.NIC
	if n.g != nil {
		nic = guest.NICOf(n.g)
	}
	n.mu.Unlock()
	counter := func(d *prometheus.Desc, v uint64, labels ...string) {
		ch <- prometheus.MustNewConstMetric(d, prometheus.CounterValue, float64(v), labels...)
	}
	if p != nil {
		counter(descTapFrames, p.received.Load(), "received")
		counter(descTapFrames, p.delivered.Load(), "delivered")
		counter(descTapFrames, p.sent.Load(), "sent")
		counter(descTapDropped, p.queueFull.Load(), "queue_full")
		counter(descTapDropped, p.writeFailed.Load(), "write_failed")
		counter(descAnnouncements, p.announcements.Load())
	}
	if nic != nil {
		c := nic.Counters()
		counter(descCardFrames, c.Received, "received")
		counter(descCardFrames, c.ARPReplies, "arp_replies")
		counter(descCardFrames, c.Datagrams, "datagrams")
		counter(descCardFrames, c.Sent, "sent")
		for r, name := range netframe.DropNames {
			counter(descCardDropped, c.Dropped[r], name)
		}
		counter(descCardDropped, queueDrops(nic), "queue_full")
	}
	nm.collectGate(ch, loop, nic != nil)
}

// collectGate exports the output gate's frame figures, added up across
// the node's epoch loops, once a loop protected a guest with a card.
func (nm *netMetrics) collectGate(ch chan<- prometheus.Metric, loop *failover.EpochLoop, card bool) {
	var held, heldBytes int
	var rel, drop uint64
	have := loop != nil && card
	if have {
		held, heldBytes = loop.Gate().HeldFrames()
		rel, drop = loop.Gate().Frames(), loop.Gate().FramesDropped()
	}
	nm.mu.Lock()
	newLoop := have && loop != nm.loop
	if newLoop {
		nm.loop = loop
	}
	nm.gateSeen = nm.gateSeen || have
	seen := nm.gateSeen
	rel = nm.released.total(newLoop, rel, have)
	drop = nm.dropd.total(newLoop, drop, have)
	nm.mu.Unlock()
	if !seen {
		return
	}
	ch <- prometheus.MustNewConstMetric(descFramesHeld, prometheus.GaugeValue, float64(held))
	ch <- prometheus.MustNewConstMetric(descFramesHeldB, prometheus.GaugeValue, float64(heldBytes))
	ch <- prometheus.MustNewConstMetric(descFramesRel, prometheus.CounterValue, float64(rel))
	ch <- prometheus.MustNewConstMetric(descGateDropped, prometheus.CounterValue, float64(drop))
}

// queueDrops is the frames a card dropped on a full receive queue (0 for
// a card that does not count them).
func queueDrops(nic guest.NIC) uint64 {
	if q, ok := nic.(interface{ QueueDrops() uint64 }); ok {
		return q.QueueDrops()
	}
	return 0
}
