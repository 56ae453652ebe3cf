package api

import (
	"encoding/json"
	"reflect"
	"sort"
	"strings"
	"testing"
)

// populated sets every field of v (a pointer to a struct) to a non-zero
// value, recursively, so omitempty drops nothing.
func populated(t *testing.T, v reflect.Value) {
	t.Helper()
	switch v.Kind() {
	case reflect.Pointer:
		if v.IsNil() {
			v.Set(reflect.New(v.Type().Elem()))
		}
		populated(t, v.Elem())
	case reflect.Struct:
		for i := 0; i < v.NumField(); i++ {
			if v.Type().Field(i).IsExported() {
				populated(t, v.Field(i))
			}
		}
	case reflect.String:
		v.SetString("x")
	case reflect.Bool:
		v.SetBool(true)
	case reflect.Int, reflect.Int64:
		v.SetInt(1)
	case reflect.Uint64:
		v.SetUint(1)
	case reflect.Float64:
		v.SetFloat(1)
	case reflect.Slice:
		v.Set(reflect.MakeSlice(v.Type(), 1, 1))
		populated(t, v.Index(0))
	default:
		t.Fatalf("populated: kind %s", v.Kind())
	}
}

func keysOf(t *testing.T, v any) []string {
	t.Helper()
	b, err := json.Marshal(v)
	if err != nil {
		t.Fatal(err)
	}
	var m map[string]json.RawMessage
	if err := json.Unmarshal(b, &m); err != nil {
		t.Fatal(err)
	}
	var keys []string
	for k, raw := range m {
		keys = append(keys, k)
		if strings.HasPrefix(string(raw), "{") {
			var sub map[string]json.RawMessage
			json.Unmarshal(raw, &sub)
			for sk := range sub {
				keys = append(keys, k+"."+sk)
			}
		}
	}
	sort.Strings(keys)
	return keys
}

// goldenNodeKeys is every key of GET /status (one level into objects),
// on every role: a key that does not apply is null. These names are a
// contract with operators' tools (docs/OPERATIONS.md documents each): a
// rename must fail here first. ft's TestStatusSchema pins what each role
// really sends, all levels deep.
var goldenNodeKeys = strings.Fields(`
acked_epochs ack_latency_p50_ms ack_latency_p99_ms activated aborted_completions attempts backpressure_stalls build
cluster cluster.can_release cluster.epoch cluster.generation cluster.id cluster.image
cluster.primary cluster.protected cluster.raft_leader cluster.waiting_reason
commit_sent commits committed_digest completion_attempts consistent destination destination_digest disk_dropped_writes disk_path
dirty_pages_rate dirty_sync_count digest_mismatches downtime_breakdown downtime_breakdown.completed
downtime_breakdown.destination_load_ms downtime_breakdown.dirty_sync_ms downtime_breakdown.final_send_ms
downtime_breakdown.flush_ms downtime_breakdown.pause_vcpus_ms downtime_breakdown.resume_ms
downtime_breakdown.state_save_ms downtime_breakdown.total_ms downtime_ms
epoch_bound epoch_trigger epochs_by_clock epochs_by_output max_output_delay_ms max_pause_fraction
paused_ms_per_second held_ms_per_second
postcopy_active postcopy_blocktime_ms postcopy_pages postcopy_refused postcopy_remaining_pages postcopy_requests
postcopy_link_down_since postcopy_link_error postcopy_resumes
postcopy_abandoned_at postcopy_source postcopy_source_unreachable_ms postcopy_source_unreachable_since postcopy_waiting_ms
postcopy_resumed_after_ms postcopy_switch_reason postcopy_switch_why
join_ack_max_ms join_pause_max_ms delta_cache_bypasses
epoch_raw_bytes epoch_raw_bytes_avg epoch_wire_bytes epoch_wire_bytes_avg epochs epochs_per_second error
expected_downtime_ms flush_aborts guest_kind image_guest_kind joins kvm_flavour last_commit_ago_ms
last_committed_epoch last_error last_mismatch last_mismatch_at last_mismatch_epoch last_mismatch_resolution
last_resync_bytes last_resync_ms
last_shipped_epoch mbps memory memory_digest memory_digest_error migration_id normal_pages outcome output_delay_p50_ms
output_delay_p99_ms output_held_bytes page_writes pause_max_ms pause_p50_ms pause_p99_ms paused primary_data protected
protection protection_reason queue_policy remaining_bytes
resync resync.bytes_sent resync.elapsed_ms resync.pages_done resync.pages_total resync.percent resync.phase resync.secondary
role round secondary secondary_lag_epochs
setup_time_ms state state_reason status store_error switchover_digest sync_policy synced_epoch syncing throttle_percent total_bytes total_time_ms
transferred_bytes vcpus verified_epochs verify_cycle_epochs verify_epochs verify_slice_pages wire_ratio
workload zero_pages
nodes quorum quorum.has_quorum quorum.leader quorum.needed quorum.one_more_failure quorum.reachable quorum.voters
net net.announcements net.arp_replies net.card_received net.card_sent net.datagrams net.dropped net.frames_delivered
net.frames_held net.frames_received net.frames_released net.frames_over_held net.frames_send_errors net.frames_sent
net.guest_ip net.tap
net.card_counters_unavailable`)

// goldenNodeViewKeys is every key of an entry of "nodes" (issue 20): each
// is present on every row, null where the answering node cannot tell.
var goldenNodeViewKeys = strings.Fields(`api_addr console_addr data_addr data_last_contact_ms epoch_lag generation id
protected raft_addr raft_last_contact_ms reachable role self`)

func TestNodeViewJSONNames(t *testing.T) {
	if got := keysOf(t, NodeView{}); !reflect.DeepEqual(got, sorted(goldenNodeViewKeys)) {
		t.Errorf("nodes entry keys (zero values included) changed\n got %q\nwant %q", got, sorted(goldenNodeViewKeys))
	}
}

func sorted(s []string) []string {
	s = append([]string(nil), s...)
	sort.Strings(s)
	return s
}

func TestStatusJSONNames(t *testing.T) {
	var st Status
	populated(t, reflect.ValueOf(&st).Elem())
	st.Witness = nil
	if got, want := keysOf(t, st), sorted(goldenNodeKeys); !reflect.DeepEqual(got, want) {
		t.Errorf("status keys changed (a JSON name is a contract)\n got %q\nwant %q", got, want)
	}
	var top []string
	for _, k := range goldenNodeKeys {
		if !strings.Contains(k, ".") {
			top = append(top, k)
		}
	}
	if got := StatusKeys(); !reflect.DeepEqual(got, sorted(top)) {
		t.Errorf("StatusKeys\n got %q\nwant %q", got, sorted(top))
	}
}

// Every role sends every key: what does not apply is null, never absent
// (a fenced node's protection, a witness's generation under cluster).
func TestStatusSameKeysEveryRole(t *testing.T) {
	yes := true
	for name, st := range map[string]Status{
		"bare":      {Role: "run", State: "waiting", Build: "b"},
		"primary":   {Role: "primary", State: "running", Build: "b", GuestInfo: GuestInfo{Kind: "synth"}, Epochs: &EpochStatus{Protection: "protected"}},
		"secondary": {Role: "secondary", State: "standby", Build: "b", MigrationStatus: MigrationStatus{Status: "standby"}, Secondary: &SecondaryStatus{}},
		"fenced":    {Role: "primary", State: "fenced", StateReason: "lease lost", Protection: "fenced", ProtectionReason: "lease lost", Build: "b"},
		"witness": {Role: "witness", Build: "b", Cluster: &ClusterView{Generation: 4, Primary: "a"},
			Nodes: []NodeView{{ID: "w", Self: true, Reachable: &yes}}, Witness: &WitnessStatus{Protected: true, LastCommittedEpoch: 9}},
	} {
		b, err := json.Marshal(st)
		if err != nil {
			t.Fatal(err)
		}
		var m map[string]json.RawMessage
		if err := json.Unmarshal(b, &m); err != nil {
			t.Fatal(err)
		}
		var keys []string
		for k := range m {
			keys = append(keys, k)
		}
		sort.Strings(keys)
		if !reflect.DeepEqual(keys, StatusKeys()) {
			t.Errorf("%s: keys %q, want StatusKeys %q", name, keys, StatusKeys())
		}
		switch name {
		case "fenced":
			if string(m["protection"]) != `"fenced"` || string(m["protected"]) != "null" || string(m["epochs"]) != "null" {
				t.Errorf("fenced: protection %s protected %s epochs %s", m["protection"], m["protected"], m["epochs"])
			}
		case "witness":
			var c map[string]json.RawMessage
			json.Unmarshal(m["cluster"], &c)
			if string(c["generation"]) != "4" || string(m["state"]) != "null" || string(m["guest_kind"]) != "null" || string(m["status"]) != "null" {
				t.Errorf("witness: cluster %s state %s guest_kind %s status %s", m["cluster"], m["state"], m["guest_kind"], m["status"])
			}
			if _, ok := c["waiting_reason"]; !ok {
				t.Errorf("witness: cluster without waiting_reason: %s", m["cluster"])
			}
		case "bare":
			if string(m["cluster"]) != "null" || string(m["guest_kind"]) != "null" || string(m["state_reason"]) != "null" {
				t.Errorf("bare: cluster %s guest_kind %s state_reason %s", m["cluster"], m["guest_kind"], m["state_reason"])
			}
		}
	}
}

func TestStatusRoundTrip(t *testing.T) {
	var st Status
	populated(t, reflect.ValueOf(&st).Elem())
	st.Witness = nil
	st.Role = "primary"
	// One value for the names two parts share, as on the wire.
	st.Secondary.DiskPath, st.GuestInfo.DiskPath = "d", "d"
	st.Secondary.Protected, st.Epochs.Protected = true, true
	st.Secondary.LastCommittedEpoch, st.Epochs.LastCommittedEpoch = 7, 7
	st.Protection, st.ProtectionReason = st.Epochs.Protection, st.Epochs.ProtectionReason
	b, err := json.Marshal(st)
	if err != nil {
		t.Fatal(err)
	}
	var back Status
	if err := json.Unmarshal(b, &back); err != nil {
		t.Fatal(err)
	}
	if !reflect.DeepEqual(back, st) {
		t.Fatalf("round trip:\n got %+v\nwant %+v", back, st)
	}
	if back.LastCommittedEpoch() != 7 || !back.Protected() {
		t.Fatalf("LastCommittedEpoch %d Protected %v", back.LastCommittedEpoch(), back.Protected())
	}

	// A node without protection: no Epochs, no Secondary; protected null.
	plain := Status{Role: "run", State: "running", Build: "b"}
	b, _ = json.Marshal(plain)
	if !strings.Contains(string(b), `"protected":null`) {
		t.Fatalf("unprotected node: protected not null: %s", b)
	}
	back = Status{}
	if err := json.Unmarshal(b, &back); err != nil || back.Epochs != nil || back.Secondary != nil || back.Witness != nil {
		t.Fatalf("plain round trip: %+v %v", back, err)
	}

	w := Status{Role: "witness", Build: "b", Cluster: &ClusterView{Generation: 3, Primary: "a", Protected: true, Epoch: 9},
		Witness: &WitnessStatus{Protected: true, LastCommittedEpoch: 9}}
	b, _ = json.Marshal(w)
	back = Status{}
	if err := json.Unmarshal(b, &back); err != nil || !reflect.DeepEqual(back, w) {
		t.Fatalf("witness round trip: %+v %v (%s)", back, err, b)
	}
}
