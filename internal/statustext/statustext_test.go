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
