package api

import (
	"encoding/json"
)

// Status is the JSON of GET /status on any node. On the wire it is one
// flat object: the node's own fields, its guest's (GuestInfo) and its
// migration's figures (MigrationStatus) at the top level, the raft view
// under "cluster", and the protection figures of a primary (Epochs) or a
// secondary (Secondary) merged into the top level as well (both name
// last_committed_epoch and protected, so they cannot be embedded side by
// side). A witness's status is Role, Build and Witness only.
type Status struct {
	Role        string `json:"role"`
	State       string `json:"state"`
	StateReason string `json:"state_reason,omitempty"`
	GuestInfo
	MigrationStatus
	MemoryDigest string `json:"memory_digest,omitempty"`
	// MemoryDigestError says why a digest asked for was not taken (the
	// guest did not pause in time, another digest was running).
	MemoryDigestError string       `json:"memory_digest_error,omitempty"`
	Build             string       `json:"build"`
	Cluster           *ClusterView `json:"cluster,omitempty"`
	// Nodes is every cluster member as this node sees it (this node alone
	// without raft), on every role; Quorum is raft's majority as this
	// node sees it (null without raft). Added by issue 20: the cluster
	// first, in the same place on every role.
	Nodes  []NodeView  `json:"nodes"`
	Quorum *QuorumView `json:"quorum"`

	// Merged into the top level by MarshalJSON; UnmarshalJSON sets each
	// one whose fields are present.
	Epochs    *EpochStatus     `json:"-"`
	Secondary *SecondaryStatus `json:"-"`
	Witness   *WitnessStatus   `json:"-"`
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

// MarshalJSON flattens the node's status and its protection figures into
// one object (later parts win a shared name: a secondary's disk_path over
// the guest's).
func (s Status) MarshalJSON() ([]byte, error) {
	if s.Witness != nil {
		return json.Marshal(struct {
			Role   string      `json:"role"`
			Build  string      `json:"build"`
			Nodes  []NodeView  `json:"nodes"`
			Quorum *QuorumView `json:"quorum"`
			*WitnessStatus
		}{s.Role, s.Build, s.Nodes, s.Quorum, s.Witness})
	}
	out := map[string]json.RawMessage{}
	parts := []any{statusPlain(s)}
	if s.Epochs != nil {
		parts = append(parts, s.Epochs)
	}
	if s.Secondary != nil {
		parts = append(parts, s.Secondary)
	}
	for _, part := range parts {
		b, err := json.Marshal(part)
		if err != nil {
			return nil, err
		}
		if err := json.Unmarshal(b, &out); err != nil {
			return nil, err
		}
	}
	return json.Marshal(out)
}

// UnmarshalJSON reads the flat object: Epochs is set when the primary's
// figures are there ("protection"), Secondary when a secondary's are
// ("consistent"), Witness when the role is "witness".
func (s *Status) UnmarshalJSON(b []byte) error {
	var keys map[string]json.RawMessage
	if err := json.Unmarshal(b, &keys); err != nil {
		return err
	}
	*s = Status{}
	if err := json.Unmarshal(b, (*statusPlain)(s)); err != nil {
		return err
	}
	if s.Role == "witness" {
		s.Witness = new(WitnessStatus)
		return json.Unmarshal(b, s.Witness)
	}
	if _, ok := keys["protection"]; ok {
		s.Epochs = new(EpochStatus)
		if err := json.Unmarshal(b, s.Epochs); err != nil {
			return err
		}
	}
	if _, ok := keys["consistent"]; ok {
		s.Secondary = new(SecondaryStatus)
		if err := json.Unmarshal(b, s.Secondary); err != nil {
			return err
		}
	}
	return nil
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
	// (the final sync left more than fits the limit; nothing was sent).
	Outcome string `json:"outcome"`
}

// MigrationStatus is the figure set of query-migrate, plus Tandem's own.
// JSON names are part of the command-line contract.
type MigrationStatus struct {
	Status             string            `json:"status"`
	TotalTimeMs        int64             `json:"total_time_ms"`
	SetupTimeMs        int64             `json:"setup_time_ms"`
	DowntimeMs         int64             `json:"downtime_ms"`
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

// ClusterView is the raft part of a member's status ("cluster").
type ClusterView struct {
	ID         string   `json:"id"`
	Generation uint64   `json:"generation"`
	Primary    string   `json:"primary"`
	Leader     string   `json:"raft_leader"`
	Protected  bool     `json:"protected"`
	Epoch      uint64   `json:"epoch"`
	Members    []string `json:"members"`
	CanRelease bool     `json:"can_release"`
	// Image is what this node could resume and whether raft lets it.
	Image string `json:"image"`
	// Waiting says why nobody serves the guest, when this node can tell:
	// the committed generation and epoch, and the node needed.
	Waiting string `json:"waiting_reason,omitempty"`
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
	Reachable *bool  `json:"reachable"`
	RaftAddr  string `json:"raft_addr"`
	APIAddr   string `json:"api_addr"`
	DataAddr  string `json:"data_addr"`
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

// WitnessStatus is a witness's view of raft (at the top level of its
// status).
type WitnessStatus struct {
	Generation         uint64 `json:"generation"`
	Primary            string `json:"primary"`
	Leader             string `json:"raft_leader"`
	Protected          bool   `json:"protected"`
	LastCommittedEpoch uint64 `json:"last_committed_epoch"`
	Waiting            string `json:"waiting_reason"`
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
}

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
