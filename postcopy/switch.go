package postcopy

import (
	"net"
	"time"

	"github.com/tandemvm/tandem/guest"
	"github.com/tandemvm/tandem/precopy"
)

// SendMissing is the source's word at the switch, on the urgent
// connection before anything else: the pages the destination will lack
// (the same runs the destination sends back when Run starts). An empty
// set says the completion is precopy's and no Run follows. The set goes
// here, not on the migration's control line, which is bounded at 64 KiB.
func SendMissing(urgent net.Conn, missing *precopy.Bitmap, timeout time.Duration) error {
	w := newFrameWriter(urgent, cmpOr(timeout, DefaultLinkTimeout))
	return writeRuns(w, runsOf(missing, missing.Len()))
}

// ReadMissing is the destination's reading of SendMissing, bounded by
// regions (the destination guest's memory): the set, ready to be
// TargetConfig.Missing. The reader is dropped after it: nothing follows
// the set until the destination's Run starts.
func ReadMissing(urgent net.Conn, regions []guest.Region, timeout time.Duration) (*precopy.Bitmap, error) {
	return readRuns(newFrameReader(urgent, cmpOr(timeout, DefaultLinkTimeout)), newPageMap(regions))
}
