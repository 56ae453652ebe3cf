package api

import (
	"encoding/json"
	"maps"
	"reflect"
	"slices"
	"strings"
)

// Status is the JSON of GET /status on any node. On the wire it is one
// flat object whose keys are the same on every role (see
// docs/OPERATIONS.md, "The status JSON"): a key that does not apply to
// the node is null, never absent. The node's own fields, its guest's
// (GuestInfo) and its migration's figures (MigrationStatus) are at the
// top level, the raft view under "cluster" (the witness's too), the
// cluster's members under "nodes", and the protection figures of a
// primary (Epochs), a secondary (Secondary) or a witness (Witness) merged
// into the top level as well (they share protected and
// last_committed_epoch, so they cannot be embedded side by side).
//
// On the wire an omitempty field is null when empty: omitempty says "no
// value" here, and MarshalJSON puts the key back as null.
type Status struct {
	Role string `json:"role"`
	// State is the guest node's state (null on the witness).
	State       string `json:"state,omitempty"`
	StateReason string `json:"state_reason,omitempty"`
	// Protection and ProtectionReason are the protection of the guest
	// this node runs or ran: a primary's epoch loop's state (its Epochs
	// say the same), "fenced" on a fenced node; null elsewhere.
	Protection       string `json:"protection,omitempty"`
	ProtectionReason string `json:"protection_reason,omitempty"`
	// GuestInfo's fields are null when the node has no guest (Kind "").
	GuestInfo
	// MigrationStatus's fields are null when Status is "" (a witness).
	MigrationStatus
	MemoryDigest string `json:"memory_digest,omitempty"`
	// MemoryDigestError says why a digest asked for was not taken (the
	// guest did not pause in time, another digest was running).
	MemoryDigestError string `json:"memory_digest_error,omitempty"`
	Build             string `json:"build"`
	// Cluster is the raft view (null without raft).
	Cluster *ClusterView `json:"cluster"`
	// Nodes is every cluster member as this node sees it (this node alone
	// without raft), on every role; Quorum is raft's majority as this
	// node sees it (null without raft).
	Nodes  []NodeView  `json:"nodes"`
	Quorum *QuorumView `json:"quorum"`
	// Net is the guest's network card and this node's TAP device (null
	// when neither is there).
	Net *NetStatus `json:"net"`

	// Merged into the top level by MarshalJSON; UnmarshalJSON sets each
	// one whose fields are there (not null).
	Epochs    *EpochStatus     `json:"-"`
	Secondary *SecondaryStatus `json:"-"`
	Witness   *WitnessStatus   `json:"-"`
}

// NetStatus is the guest network as this node sees it: its TAP device
// (--net) and the card of the guest it runs (--guest-ip).
type NetStatus struct {
	// Tap is this node's device ("" without --net); GuestIP the card's
	// address with its prefix ("" when this node runs no guest with one).
	Tap     string `json:"tap"`
	GuestIP string `json:"guest_ip"`
	// The device's frames: read from the network, handed to the guest's
	// card, written to the network, and dropped on a write that failed
	// or timed out.
	FramesReceived   uint64 `json:"frames_received"`
	FramesDelivered  uint64 `json:"frames_delivered"`
	FramesSent       uint64 `json:"frames_sent"`
	FramesSendErrors uint64 `json:"frames_send_errors"`
	// Announcements counts the gratuitous ARPs this node queued for the
	// guest's address (five each time it starts running the guest).
	Announcements uint64 `json:"announcements"`
	// The card's stack (guest/netframe): frames it took in, ARP requests
	// it answered, datagrams it served, frames it built, and frames it
	// dropped by reason. Zero without a card.
	CardReceived uint64        `json:"card_received"`
	ARPReplies   uint64        `json:"arp_replies"`
	Datagrams    uint64        `json:"datagrams"`
	CardSent     uint64        `json:"card_sent"`
	Dropped      DroppedFrames `json:"dropped"`
	// CardCountersUnavailable says why the card's figures above are not
	// its counts now (null: they are): on a post-copy destination the
	// card's page in guest memory may not have arrived yet, and status
	// does not wait for it (the figures are the last read).
	CardCountersUnavailable string `json:"card_counters_unavailable,omitempty"`
	// FramesReleased is what a protected primary's output gate let out
	// after their epochs were acknowledged (null on other nodes).
	FramesReleased *uint64 `json:"frames_released"`
	// FramesOverHeld counts the frames that gate dropped because 16 MiB
	// of frames already waited for their epochs (null on other nodes).
	FramesOverHeld *uint64 `json:"frames_over_held"`
	// FramesHeld is the frames that gate holds now, waiting for their
	// epochs' acknowledgements (null on other nodes).
	FramesHeld *int `json:"frames_held"`
}

// DroppedFrames are the frames a guest's card dropped, by reason (the
// names are guest/netframe's DropNames).
type DroppedFrames struct {
	Short       uint64 `json:"short"`
	TooLong     uint64 `json:"too_long"`
	BadLength   uint64 `json:"bad_length"`
	BadChecksum uint64 `json:"bad_checksum"`
	Fragment    uint64 `json:"fragment"`
	Unsupported uint64 `json:"unsupported"`
	NotOurs     uint64 `json:"not_ours"`
	// QueueFull: received while the card's receive queue was full (the
	// guest did not keep up); these never reached its stack.
	QueueFull uint64 `json:"queue_full"`
}

// LastCommittedEpoch is the last epoch committed on the secondary as this
// node knows it: a primary's, a secondary's or a witness's figure (0 when
// it has none).
func (s Status) LastCommittedEpoch() uint64 {
	switch {
	case s.Epochs != nil:
		return s.Epochs.LastCommittedEpoch
	case s.Secondary != nil:
		return s.Secondary.LastCommittedEpoch
	case s.Witness != nil:
		return s.Witness.LastCommittedEpoch
	}
	return 0
}

// Protected says whether a primary's epochs are acknowledged by a
// secondary, or a secondary holds a consistent image a primary streams to
// (a witness: whether raft records the pair as protected).
func (s Status) Protected() bool {
	switch {
	case s.Epochs != nil:
		return s.Epochs.Protected
	case s.Secondary != nil:
		return s.Secondary.Protected
	case s.Witness != nil:
		return s.Witness.Protected
	}
	return false
}

// statusPlain is Status without its methods (no recursion).
type statusPlain Status

// StatusKeys is every top-level key of GET /status, sorted: the same set
// on every role.
func StatusKeys() []string {
	return slices.Clone(statusKeys)
}

var statusKeys = func() []string {
	var keys []string
	for _, t := range []reflect.Type{reflect.TypeFor[statusPlain](), reflect.TypeFor[EpochStatus](),
		reflect.TypeFor[SecondaryStatus](), reflect.TypeFor[WitnessStatus]()} {
		keys = append(keys, jsonNames(t)...)
	}
	slices.Sort(keys)
	return slices.Compact(keys)
}()

var null = json.RawMessage("null")

// MarshalJSON writes every key of StatusKeys: the node's own, then its
// protection figures over them (later parts win a shared name: a
// secondary's disk_path over the guest's), null where no part has a
// value.
func (s Status) MarshalJSON() ([]byte, error) {
	out := make(map[string]json.RawMessage, len(statusKeys))
	for _, k := range statusKeys {
		out[k] = null
	}
	parts := []any{statusPlain(s)}
	if s.Epochs != nil {
		parts = append(parts, s.Epochs)
	}
	if s.Secondary != nil {
		parts = append(parts, s.Secondary)
	}
	if s.Witness != nil {
		parts = append(parts, s.Witness)
	}
	for i, part := range parts {
		b, err := json.Marshal(part)
		if err != nil {
			return nil, err
		}
		var m map[string]json.RawMessage
		if err := json.Unmarshal(b, &m); err != nil {
			return nil, err
		}
		if i == 0 {
			// Parts of the node's own fields that it does not have.
			if s.GuestInfo.Kind == "" {
				for _, k := range jsonNames(reflect.TypeFor[GuestInfo]()) {
					delete(m, k)
				}
			}
			if s.MigrationStatus.Status == "" {
				for _, k := range jsonNames(reflect.TypeFor[MigrationStatus]()) {
					delete(m, k)
				}
			}
		}
		maps.Copy(out, m)
	}
	return json.Marshal(out)
}

// UnmarshalJSON reads the flat object: Epochs is set when a primary's
// figures are there (last_shipped_epoch not null), Secondary when a
// secondary's are (consistent not null), Witness when the role is
// "witness".
func (s *Status) UnmarshalJSON(b []byte) error {
	var keys map[string]json.RawMessage
	if err := json.Unmarshal(b, &keys); err != nil {
		return err
	}
	has := func(k string) bool {
		v, ok := keys[k]
		return ok && string(v) != "null"
	}
	*s = Status{}
	if err := json.Unmarshal(b, (*statusPlain)(s)); err != nil {
		return err
	}
	if s.Role == "witness" {
		s.Witness = new(WitnessStatus)
		return json.Unmarshal(b, s.Witness)
	}
	if has("last_shipped_epoch") {
		s.Epochs = new(EpochStatus)
		if err := json.Unmarshal(b, s.Epochs); err != nil {
			return err
		}
	}
	if has("consistent") {
		s.Secondary = new(SecondaryStatus)
		if err := json.Unmarshal(b, s.Secondary); err != nil {
			return err
		}
	}
	return nil
}

// jsonNames lists the JSON names of t's fields (a struct), those of
// embedded structs included, "-" left out.
func jsonNames(t reflect.Type) []string {
	var out []string
	for i := range t.NumField() {
		f := t.Field(i)
		if !f.IsExported() {
			continue
		}
		name, _, _ := strings.Cut(f.Tag.Get("json"), ",")
		if f.Anonymous && name == "" && f.Type.Kind() == reflect.Struct {
			out = append(out, jsonNames(f.Type)...)
			continue
		}
		switch name {
		case "-":
		case "":
			out = append(out, f.Name)
		default:
			out = append(out, name)
		}
	}
	return out
}

// marshalFilled marshals plain (a struct value of a type without its own
// MarshalJSON) with every field's key present: one omitempty left out is
// null.
func marshalFilled(plain any) ([]byte, error) {
	b, err := json.Marshal(plain)
	if err != nil {
		return nil, err
	}
	var m map[string]json.RawMessage
	if err := json.Unmarshal(b, &m); err != nil {
		return nil, err
	}
	for _, k := range jsonNames(reflect.TypeOf(plain)) {
		if _, ok := m[k]; !ok {
			m[k] = null
		}
	}
	return json.Marshal(m)
}

// GuestInfo describes a node's guest.
type GuestInfo struct {
	Kind     string `json:"guest_kind"`
	Flavour  string `json:"kvm_flavour,omitempty"`
	Memory   string `json:"memory"`
	VCPUs    int    `json:"vcpus"`
	Workload string `json:"workload"`
	Paused   bool   `json:"paused"`
	// DiskPath is the file this node's guest disk is, when it has one
	// (for a received guest, the receiver's own, never the sender's).
	DiskPath string `json:"disk_path,omitempty"`
	// DiskDroppedWrites counts disk writes dropped from the log of
	// writes not yet shipped (over its bound). Each rise forces the next
	// epoch to ship the whole disk to the secondary (logged).
	DiskDroppedWrites uint64 `json:"disk_dropped_writes,omitempty"`
	// PageWrites counts the dirty workload's page writes since the guest
	// first booted (the guest's own count, carried with its state): the
	// write rate it achieves, beside the --dirty-rate it was asked for.
	PageWrites uint64 `json:"page_writes,omitempty"`
}

// DowntimeBreakdown is where a migration's downtime went.
type DowntimeBreakdown struct {
	PauseVCPUsMs      float64 `json:"pause_vcpus_ms"`
	FlushMs           float64 `json:"flush_ms"`
	DirtySyncMs       float64 `json:"dirty_sync_ms"`
	StateSaveMs       float64 `json:"state_save_ms"`
	FinalSendMs       float64 `json:"final_send_ms"`
	DestinationLoadMs float64 `json:"destination_load_ms"`
	ResumeMs          float64 `json:"resume_ms"`
	TotalMs           float64 `json:"total_ms"`
	// Completed is false for an aborted attempt (the guest resumed on the
	// source after the flush missed its budget).
	Completed bool `json:"completed"`
}

// CompletionAttempt is one stop-and-copy attempt of a migration: the
// downtime the controller expected and the one it got, so a prediction
// that was wrong shows (issue 11: the limit is a ceiling).
type CompletionAttempt struct {
	// ExpectedDowntimeMs is the prediction the attempt was decided on.
	ExpectedDowntimeMs float64 `json:"expected_downtime_ms"`
	// FinalPages is what the final dirty sync left to send, and
	// FinalExpectedMs the downtime predicted for it then: time paused so
	// far plus the final send at the learned rate.
	FinalPages      uint64  `json:"final_pages"`
	FinalExpectedMs float64 `json:"final_expected_ms"`
	// ActualDowntimeMs is the pause as it happened: to the destination's
	// resume, or to the source's own resume for an aborted attempt.
	ActualDowntimeMs float64 `json:"actual_downtime_ms"`
	FinalSendMs      float64 `json:"final_send_ms,omitempty"`
	// Outcome is "completed", "aborted: flush" or "aborted: prediction"
	// (the final sync left more than fits the limit; nothing was sent);
	// for a switch to post-copy (docs/POSTCOPY.md) "post-copy switch",
	// or "post-copy switch: over the limit" when its pause was longer
	// than the downtime limit (the switch is not given up for that).
	// FinalPages is then the pages owed.
	Outcome string `json:"outcome"`
}

// MarshalJSON writes every key, final_send_ms null when nothing was sent.
func (a CompletionAttempt) MarshalJSON() ([]byte, error) {
	type plain CompletionAttempt
	return marshalFilled(plain(a))
}

// MigrationStatus is the figure set of query-migrate, plus Tandem's own.
// JSON names are part of the command-line contract.
type MigrationStatus struct {
	Status             string            `json:"status"`
	TotalTimeMs        int64             `json:"total_time_ms"`
	SetupTimeMs        int64             `json:"setup_time_ms"`
	DowntimeMs         int64             `json:"downtime_ms"` // rounded up: a sub-millisecond pause is 1
	ExpectedDowntimeMs int64             `json:"expected_downtime_ms"`
	TransferredBytes   uint64            `json:"transferred_bytes"`
	RemainingBytes     uint64            `json:"remaining_bytes"`
	TotalBytes         uint64            `json:"total_bytes"`
	ZeroPages          uint64            `json:"zero_pages"`
	NormalPages        uint64            `json:"normal_pages"`
	DirtyPagesRate     uint64            `json:"dirty_pages_rate"`
	Mbps               float64           `json:"mbps"`
	DirtySyncCount     uint64            `json:"dirty_sync_count"`
	ThrottlePercent    int               `json:"throttle_percent"`
	CompletionAttempts int               `json:"completion_attempts"`
	AbortedCompletions int               `json:"aborted_completions"`
	Round              int               `json:"round"`
	Error              string            `json:"error,omitempty"`
	DowntimeBreakdown  DowntimeBreakdown `json:"downtime_breakdown"`
	// Attempts lists every completion attempt, oldest first.
	Attempts []CompletionAttempt `json:"attempts,omitempty"`
	// SwitchoverDigest is this end's digest of guest memory and state at
	// the switch-over (the source's at its final pause, taken once the
	// destination acknowledged while the guest stays stopped);
	// DestinationDigest is what the destination reported for itself.
	SwitchoverDigest  string `json:"switchover_digest,omitempty"`
	DestinationDigest string `json:"destination_digest,omitempty"`
	Destination       string `json:"destination,omitempty"`
	// Outcome is how the switch-over ended as the source knows it (one of
	// precopy's Outcome constants); CommitSent says the source has stopped
	// its guest for good and sent the commit (a destination left awaiting
	// it reads this to resume); MigrationID names the migration.
	Outcome     string `json:"outcome,omitempty"`
	CommitSent  bool   `json:"commit_sent,omitempty"`
	MigrationID string `json:"migration_id,omitempty"`
	// Post-copy (docs/POSTCOPY.md), on both ends: PostcopyActive while
	// the guest runs on the destination with pages still missing;
	// PostcopyPages the pages owed at the switch, PostcopyRemainingPages
	// those not arrived (destination) or not sent (source) yet;
	// PostcopyRequests the pages a faulting vCPU asked for;
	// PostcopyBlocktimeMs (destination) each vCPU's time waiting for
	// pages. PostcopyRefused (source) is why a --postcopy migration
	// stays precopy-only. PostcopySwitchReason (source) is what made
	// the switch: "rounds" (--postcopy-after-rounds), "command" (POST
	// /migrate/postcopy) or "controller" (it predicted precopy would not
	// converge); PostcopySwitchWhy is the decision's one line;
	// PostcopyResumedAfterMs is when, since the migration started, the
	// destination resumed the guest at the switch.
	PostcopyActive         bool    `json:"postcopy_active,omitempty"`
	PostcopyPages          uint64  `json:"postcopy_pages,omitempty"`
	PostcopyRemainingPages uint64  `json:"postcopy_remaining_pages,omitempty"`
	PostcopyRequests       uint64  `json:"postcopy_requests,omitempty"`
	PostcopyBlocktimeMs    []int64 `json:"postcopy_blocktime_ms,omitempty"`
	PostcopyRefused        string  `json:"postcopy_refused,omitempty"`
	// While a post-copy's link is lost (status "postcopy-paused", on
	// both ends): PostcopyLinkDownSince is when (RFC 3339, UTC) and
	// PostcopyLinkError why. PostcopyResumes counts the runs `tandem
	// migrate --resume` reconnected.
	PostcopyLinkDownSince string `json:"postcopy_link_down_since,omitempty"`
	PostcopyLinkError     string `json:"postcopy_link_error,omitempty"`
	PostcopyResumes       int    `json:"postcopy_resumes,omitempty"`
	// The source's death during post-copy, on the destination
	// (docs/POSTCOPY.md, "Source death"): PostcopySource is the source
	// the missing pages come from (its API, as it gave it);
	// PostcopySourceUnreachableSince (RFC 3339, UTC: its last frame)
	// and PostcopySourceUnreachableMs say since when and how long the
	// destination has had no word from it, once its link is lost (null
	// while connected);
	// PostcopyWaitingMs is, per vCPU, how long it has been blocked on
	// the missing page it needs now (0: not blocked); and
	// PostcopyAbandonedAt is when an operator declared the source lost
	// (POST /migrate/abandon): the guest is stopped for good, and
	// postcopy_remaining_pages are the pages it never received.
	PostcopySource                 string  `json:"postcopy_source,omitempty"`
	PostcopySourceUnreachableSince string  `json:"postcopy_source_unreachable_since,omitempty"`
	PostcopySourceUnreachableMs    int64   `json:"postcopy_source_unreachable_ms,omitempty"`
	PostcopyWaitingMs              []int64 `json:"postcopy_waiting_ms,omitempty"`
	PostcopyAbandonedAt            string  `json:"postcopy_abandoned_at,omitempty"`
	PostcopySwitchReason           string  `json:"postcopy_switch_reason,omitempty"`
	PostcopySwitchWhy              string  `json:"postcopy_switch_why,omitempty"`
	PostcopyResumedAfterMs         int64   `json:"postcopy_resumed_after_ms,omitempty"`
}

// AbandonRequest is the body of POST /migrate/abandon on a post-copy
// destination: MigrationID, if set, must name its migration.
type AbandonRequest struct {
	MigrationID string `json:"migration_id,omitempty"`
}

// AbandonResult is the answer of POST /migrate/abandon.
type AbandonResult struct {
	OK          bool   `json:"ok"`
	MigrationID string `json:"migration_id"`
	Source      string `json:"source"`
	// PagesLost are the pages the guest never received.
	PagesLost uint64 `json:"pages_lost"`
	// Detail says what was done and what stays as it is (the source's
	// copy, if its process lives, stays paused).
	Detail string `json:"detail"`
}

// EpochStatus is a protected primary's epoch loop.
type EpochStatus struct {
	Protected          bool    `json:"protected"`
	Protection         string  `json:"protection"`
	ProtectionReason   string  `json:"protection_reason,omitempty"`
	Secondary          string  `json:"secondary,omitempty"`
	LastCommittedEpoch uint64  `json:"last_committed_epoch"`
	LastShippedEpoch   uint64  `json:"last_shipped_epoch"`
	SecondaryLag       int     `json:"secondary_lag_epochs"`
	EpochsPerSecond    float64 `json:"epochs_per_second"`
	Epochs             uint64  `json:"epochs"`
	AckedEpochs        uint64  `json:"acked_epochs"`
	PauseP50Ms         float64 `json:"pause_p50_ms"`
	PauseP99Ms         float64 `json:"pause_p99_ms"`
	PauseMaxMs         float64 `json:"pause_max_ms"`
	// JoinPauseMaxMs and JoinAckMaxMs are the longest pause and
	// acknowledgement of the join's epochs: those paused before
	// protection began (the catch-up's tail), which the pause and ack
	// quantiles leave out; null before the first protection, back to 0
	// when protection is lost (then the join in progress).
	JoinPauseMaxMs *float64 `json:"join_pause_max_ms"`
	JoinAckMaxMs   *float64 `json:"join_ack_max_ms"`
	// DeltaCacheBypasses counts the times the stream's writer set its
	// XOR delta cache aside because deltas stopped winning (whole-page
	// rewrites with fresh data): each lasts 262,144 pages or 3 s.
	DeltaCacheBypasses uint64 `json:"delta_cache_bypasses"`
	// EpochRawBytes and EpochWireBytes are totals over all epochs (dirty
	// page bytes captured, stream bytes shipped); the _avg figures are
	// per epoch, and WireRatio is wire over raw.
	EpochRawBytes      uint64  `json:"epoch_raw_bytes"`
	EpochWireBytes     uint64  `json:"epoch_wire_bytes"`
	EpochRawBytesAvg   uint64  `json:"epoch_raw_bytes_avg"`
	EpochWireBytesAvg  uint64  `json:"epoch_wire_bytes_avg"`
	WireRatio          float64 `json:"wire_ratio"`
	AckLatencyP50Ms    float64 `json:"ack_latency_p50_ms"`
	AckLatencyP99Ms    float64 `json:"ack_latency_p99_ms"`
	OutputDelayP50Ms   float64 `json:"output_delay_p50_ms"`
	OutputDelayP99Ms   float64 `json:"output_delay_p99_ms"`
	OutputHeldBytes    int     `json:"output_held_bytes"`
	FlushAborts        uint64  `json:"flush_aborts"`
	BackpressureStalls uint64  `json:"backpressure_stalls"`
	VerifyEpochs       bool    `json:"verify_epochs"`
	VerifiedEpochs     uint64  `json:"verified_epochs"`
	DigestMismatches   uint64  `json:"digest_mismatches"`
	LastMismatch       string  `json:"last_mismatch,omitempty"`
	// The last mismatch: the epoch, when (RFC 3339, UTC) and how it was
	// resolved ("re-syncing ..." until a verified epoch matches again).
	LastMismatchEpoch      uint64 `json:"last_mismatch_epoch,omitempty"`
	LastMismatchAt         string `json:"last_mismatch_at,omitempty"`
	LastMismatchResolution string `json:"last_mismatch_resolution,omitempty"`
	// VerifySlicePages is re-read at every pause that ends an epoch of
	// the interval (a shorter, output-triggered epoch re-reads its
	// share); VerifyCycleEpochs is how many such epochs (intervals) it
	// takes to check every page once.
	VerifySlicePages  int    `json:"verify_slice_pages,omitempty"`
	VerifyCycleEpochs uint64 `json:"verify_cycle_epochs,omitempty"`
	Joins             uint64 `json:"joins"`
	QueuePolicy       string `json:"queue_policy"`
	// What ends an epoch: "clock" (every interval) or "output" (early
	// for held output, issue 17); with "output", EpochBound is the
	// bound that set the last decision (interval, output, output-delay,
	// min-interval, pause-fraction, in-flight) and the two limits in
	// force. EpochsByOutput and EpochsByClock count epochs by what ended
	// them; PausedMsPerSecond is the guest's paused time over the last
	// second.
	EpochTrigger      string  `json:"epoch_trigger,omitempty"`
	EpochBound        string  `json:"epoch_bound,omitempty"`
	MaxOutputDelayMs  float64 `json:"max_output_delay_ms,omitempty"`
	MaxPauseFraction  float64 `json:"max_pause_fraction,omitempty"`
	EpochsByOutput    uint64  `json:"epochs_by_output"`
	EpochsByClock     uint64  `json:"epochs_by_clock"`
	PausedMsPerSecond float64 `json:"paused_ms_per_second"`
	// HeldMsPerSecond is the part of PausedMsPerSecond that held guest
	// work: pauses a guest waited idle through (guest/kvm says so) count
	// nothing. MaxPauseFraction bounds this one.
	HeldMsPerSecond float64 `json:"held_ms_per_second"`
	// ThrottlePercent is the share of time the epoch loop keeps the
	// guest's vCPUs from running because its dirty bytes outran the link
	// (epochs stretched); 0 while the secondary keeps up. A primary
	// never migrates, so this is the only throttle_percent it reports.
	ThrottlePercent int `json:"throttle_percent"`
	// Resync is the secondary's catch-up while it runs (a join: connect,
	// full sync, dirty rounds); null otherwise.
	Resync *ResyncStatus `json:"resync"`
	// LastResyncMs and LastResyncBytes are the last completed catch-up's
	// time (from its connect to its first epoch) and bytes of pages sent
	// (null before the first).
	LastResyncMs    *int64  `json:"last_resync_ms"`
	LastResyncBytes *uint64 `json:"last_resync_bytes"`
}

// ResyncStatus is a primary's catch-up of its secondary in progress.
type ResyncStatus struct {
	// Secondary is the data address joined.
	Secondary string `json:"secondary"`
	// Phase: "connecting", "full sync" (every non-zero page once),
	// "dirty round N" (pages written meanwhile), "draining" (waiting for
	// the secondary to commit what was sent).
	Phase string `json:"phase"`
	// PagesDone is the pages the full sync has gone through (sent or
	// skipped as zero) of PagesTotal (the guest's); BytesSent the page
	// bytes sent so far, dirty rounds included.
	PagesDone  uint64 `json:"pages_done"`
	PagesTotal uint64 `json:"pages_total"`
	BytesSent  uint64 `json:"bytes_sent"`
	// Percent is PagesDone over PagesTotal (the full sync's progress).
	Percent   float64 `json:"percent"`
	ElapsedMs int64   `json:"elapsed_ms"`
}

// SecondaryStatus is a secondary's committed image.
type SecondaryStatus struct {
	// Protected: the secondary holds a consistent image and a primary is
	// streaming epochs to it.
	Protected          bool   `json:"protected"`
	LastCommittedEpoch uint64 `json:"last_committed_epoch"`
	Consistent         bool   `json:"consistent"`
	Syncing            bool   `json:"syncing"`
	Primary            string `json:"primary_data,omitempty"`
	Commits            uint64 `json:"commits"`
	LastCommitAgoMs    int64  `json:"last_commit_ago_ms"`
	LastError          string `json:"last_error,omitempty"`
	Digest             string `json:"committed_digest,omitempty"`
	Activated          bool   `json:"activated"`
	GuestKind          string `json:"image_guest_kind,omitempty"`
	// DiskPath is where this node keeps its copy of the guest's disk
	// (never the path the primary named), when the guest has one.
	DiskPath string `json:"disk_path,omitempty"`
	// SyncPolicy is when stored epochs are fsynced ("memory": right after
	// the acknowledgement, "disk": before it; "" without a store), and
	// SyncedEpoch the last epoch a power loss keeps (nil: none yet).
	// StoreError says why a store was given up.
	SyncPolicy  string  `json:"sync_policy,omitempty"`
	SyncedEpoch *uint64 `json:"synced_epoch,omitempty"`
	StoreError  string  `json:"store_error,omitempty"`
}

// ClusterView is the raft part of a node's status ("cluster"), the
// witness's included: raft's record as this node has applied it. The
// members are in Status.Nodes.
type ClusterView struct {
	// ID is the answering node's.
	ID         string `json:"id"`
	Generation uint64 `json:"generation"`
	Primary    string `json:"primary"`
	Leader     string `json:"raft_leader"`
	Protected  bool   `json:"protected"`
	// Epoch is the last epoch raft records as committed on the secondary.
	Epoch uint64 `json:"epoch"`
	// CanRelease: this node may release the guest's output now (its
	// generation and lease); false on every node but the primary.
	CanRelease bool `json:"can_release"`
	// Image is what this node could resume and whether raft lets it.
	Image string `json:"image"`
	// Waiting says why nobody serves the guest, when this node can tell:
	// the committed generation and epoch, and the node needed (null when
	// the guest is served).
	Waiting string `json:"waiting_reason,omitempty"`
}

// MarshalJSON writes every key, waiting_reason null when nothing waits.
func (c ClusterView) MarshalJSON() ([]byte, error) {
	type plain ClusterView
	return marshalFilled(plain(c))
}

// NodeView is one cluster member in GET /status's "nodes". Every field is
// always present; null where this node cannot tell.
type NodeView struct {
	ID string `json:"id"`
	// Role is the member's part in raft's record: primary (the record's
	// primary), secondary or witness; "" before the first primary.
	Role string `json:"role"`
	// Self marks the node that answered.
	Self bool `json:"self"`
	// Generation is the generation the cluster's record holds (the same
	// for every member: one record).
	Generation uint64 `json:"generation"`
	// Protected: on the primary's row, whether the record says it is
	// protected; null on the others.
	Protected *bool `json:"protected"`
	// EpochLag: on the secondary's row, as its primary reports it, the
	// epochs shipped and not yet acknowledged; null when the answering
	// node is not the primary.
	EpochLag *int `json:"epoch_lag"`
	// Reachable: whether the answering node reaches this member now; null
	// when it cannot tell (a follower does not watch the other follower).
	Reachable *bool `json:"reachable"`
	// RaftLastContactMs is how long ago the answering node last heard
	// from this member over raft (a request or an answer); null on its
	// own row and for a member not heard from since it started.
	RaftLastContactMs *int64 `json:"raft_last_contact_ms"`
	// DataLastContactMs is how long ago the data link last carried a
	// word from this member: on the primary, the secondary's last
	// acknowledgement; on the secondary, the primary's last epoch or
	// handshake. Null elsewhere, and before the first.
	DataLastContactMs *int64 `json:"data_last_contact_ms"`
	RaftAddr          string `json:"raft_addr"`
	APIAddr           string `json:"api_addr"`
	DataAddr          string `json:"data_addr"`
	ConsoleAddr       string `json:"console_addr"`
}

// QuorumView is raft's majority as the answering node sees it.
type QuorumView struct {
	Voters int `json:"voters"`
	// Reachable is the voters the node knows it reaches, itself included
	// (a lower bound on a follower).
	Reachable int    `json:"reachable"`
	Needed    int    `json:"needed"`
	Leader    string `json:"leader"`
	// HasQuorum: this node reaches a majority (or hears a leader that
	// does).
	HasQuorum bool `json:"has_quorum"`
	// OneMoreFailure says in a sentence what the loss of one more node
	// would do to the guest.
	OneMoreFailure string `json:"one_more_failure"`
}

// WitnessStatus is a witness's figures at the top level of its status:
// raft's record of protection and of the last committed epoch (the rest
// of its view is under "cluster", as on every node).
type WitnessStatus struct {
	Protected          bool   `json:"protected"`
	LastCommittedEpoch uint64 `json:"last_committed_epoch"`
}

// MigrateRequest is the body of POST /migrate.
type MigrateRequest struct {
	To              string `json:"to"`
	MaxBandwidth    uint64 `json:"max_bandwidth"` // bytes/s, 0 = unlimited
	DowntimeLimitMs int64  `json:"downtime_limit_ms"`
	MaxTimeMs       int64  `json:"max_time_ms"`
	MinRetryMs      int64  `json:"min_retry_ms"`
	Compression     string `json:"compression"`
	AutoConverge    *bool  `json:"auto_converge"`
	// SourceAPI is the source's API as the destination should reach it
	// (tandem migrate sends its --from); default: the address the API
	// listens on. A destination left awaiting the commit asks it how the
	// migration ended.
	SourceAPI string `json:"source_api,omitempty"`
	// Streams is how many goroutines encode the migration stream (page
	// hashes, compression, checksums), 1 to MaxMigrateStreams; 0 means
	// 1. The stream stays one connection whose sections keep their order.
	Streams int `json:"streams,omitempty"`
	// Postcopy asks for a switch to post-copy (docs/POSTCOPY.md) when
	// the convergence controller predicts precopy will not converge,
	// and after PostcopyAfterRounds precopy rounds at the latest (nil:
	// no such limit; 0: at once, before any page is sent; round 0 is the
	// first full pass). A precopy completion the controller decides
	// first needs no switch. A destination
	// that cannot register the guest's memory with userfaultfd says so
	// in its handshake and the migration stays precopy-only. An older
	// node ignores both fields and migrates precopy-only.
	Postcopy            bool `json:"postcopy,omitempty"`
	PostcopyAfterRounds *int `json:"postcopy_after_rounds,omitempty"`
}

// MigrateResumeRequest is the body of POST /migrate/resume on a source
// whose post-copy is paused by a lost link (`tandem migrate --resume`):
// To is the destination's data address (default: the migration's),
// MigrationID the migration meant (default: the source's current one;
// another is refused as stale).
type MigrateResumeRequest struct {
	To          string `json:"to,omitempty"`
	MigrationID string `json:"migration_id,omitempty"`
}

// MaxMigrateStreams bounds MigrateRequest.Streams.
const MaxMigrateStreams = 16

// MaxPostcopyAfterRounds bounds MigrateRequest.PostcopyAfterRounds.
const MaxPostcopyAfterRounds = 1000

// SwitchoverResult is the answer of POST /switchover.
type SwitchoverResult struct {
	OK         bool   `json:"ok"`
	FinalEpoch uint64 `json:"final_epoch"`
	TookMs     int64  `json:"took_ms"`
}

// ActivateResult is the answer of POST /activate.
type ActivateResult struct {
	OK             bool   `json:"ok"`
	Role           string `json:"role"`
	ActivatedEpoch uint64 `json:"activated_epoch"`
}

// ProtectResult is the answer of POST /protect.
type ProtectResult struct {
	OK        bool   `json:"ok"`
	Secondary string `json:"secondary"`
	Name      string `json:"name"`
}
