package statustext

import (
	"bytes"
	"encoding/json"
	"strings"
	"testing"
)

func TestWriteClusterFirst(t *testing.T) {
	raw := map[string]any{}
	json.Unmarshal([]byte(`{"role":"primary","state":"running","total_bytes":0,"downtime_breakdown":{"total_ms":0},
		"nodes":[{"id":"a","role":"primary","self":true,"generation":4,"protected":true,"epoch_lag":null,"reachable":true},
		{"id":"b","role":"secondary","self":false,"generation":4,"protected":null,"epoch_lag":1,"reachable":true,"raft_last_contact_ms":12,"data_last_contact_ms":3},
		{"id":"w","role":"witness","self":false,"generation":4,"protected":null,"epoch_lag":null,"reachable":false}],
		"quorum":{"voters":3,"reachable":2,"needed":2,"leader":"a","has_quorum":true,"one_more_failure":"the guest stops: ..."},
		"resync":{"secondary":"10.0.0.2:7311","phase":"full sync","pages_done":512,"pages_total":1024,"bytes_sent":1048576,"percent":50,"elapsed_ms":1500}}`), &raw)
	var b bytes.Buffer
	Write(&b, raw)
	out := b.String()
	for _, want := range []string{"Cluster:", "a (this node)", "protected", "NO", "Quorum: has quorum: 2 of 3", "One more failure: the guest stops", "This node (primary):", "state",
		"LAST CONTACT (raft / data)", "12ms / 3ms", "Catching up the secondary 10.0.0.2:7311: full sync, 512 of 1024 pages (50%), 1.0 MiB sent, for 1.5s"} {
		if !strings.Contains(out, want) {
			t.Errorf("no %q in\n%s", want, out)
		}
	}
	if strings.Index(out, "Cluster:") > strings.Index(out, "This node") || strings.Contains(out, "total_bytes") || strings.Contains(out, "downtime_breakdown") {
		t.Errorf("not cluster first, or zero figures shown:\n%s", out)
	}
}

// A post-copy destination whose source is unreachable says so above its
// detail, with the blocked vCPUs and the two ways on; once abandoned, that
// the guest is lost.
func TestWritePostcopyAlert(t *testing.T) {
	for _, c := range []struct {
		json string
		want []string
	}{
		{`{"role":"receive","state":"running","migration_id":"0123456789abcdef","postcopy_source":"10.0.0.1:7000",
			"postcopy_source_unreachable_since":"2026-12-01T05:00:00Z","postcopy_source_unreachable_ms":12000,
			"postcopy_remaining_pages":1234,"postcopy_waiting_ms":[0,11800]}`,
			[]string{"POST-COPY SOURCE UNREACHABLE: 10.0.0.1:7000, since 2026-12-01T05:00:00Z (12s): 1234 pages exist only there",
				"vCPU 1 for 11.8s", "--resume --from 10.0.0.1:7000 --id 0123456789abcdef", "--abandon --to <this API> --id 0123456789abcdef"}},
		{`{"role":"standalone","state":"postmigrate","status":"postcopy-paused","migration_id":"0123456789abcdef","destination":"10.0.0.2:7001",
			"postcopy_link_down_since":"2026-12-01T05:00:00Z","postcopy_link_error":"read: i/o timeout","postcopy_remaining_pages":1234}`,
			[]string{"POST-COPY PAUSED: migration 0123456789abcdef committed; the link to the destination 10.0.0.2:7001 is lost since 2026-12-01T05:00:00Z (read: i/o timeout)",
				"--resume --from <this API> --id 0123456789abcdef"}},
		{`{"role":"receive","state":"lost","migration_id":"0123456789abcdef","postcopy_source":"10.0.0.1:7000",
			"postcopy_abandoned_at":"2026-12-01T05:01:00Z","postcopy_remaining_pages":1234}`,
			[]string{"GUEST LOST: post-copy migration 0123456789abcdef from 10.0.0.1:7000 was abandoned at 2026-12-01T05:01:00Z: 1234 pages never arrived"}},
	} {
		raw := map[string]any{}
		if err := json.Unmarshal([]byte(c.json), &raw); err != nil {
			t.Fatal(err)
		}
		var b bytes.Buffer
		Write(&b, raw)
		out := b.String()
		for _, want := range c.want {
			if !strings.Contains(out, want) {
				t.Errorf("no %q in\n%s", want, out)
			}
		}
		if strings.Index(out, "This node") < strings.Index(out, c.want[0]) {
			t.Errorf("the alert is not above the detail:\n%s", out)
		}
	}
	var b bytes.Buffer
	Write(&b, map[string]any{"role": "receive", "state": "running", "postcopy_active": true})
	if strings.Contains(b.String(), "UNREACHABLE") || strings.Contains(b.String(), "LOST") {
		t.Errorf("an alert without trouble:\n%s", b.String())
	}
}
