package statustext

import (
	"encoding/json"
	"fmt"
	"io"
	"sort"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/tandemvm/tandem/api"
)

// clusterKeys are shown in the cluster part (or are its raw material) and
// not repeated in the node's detail.
var clusterKeys = map[string]bool{"nodes": true, "quorum": true, "cluster": true, "resync": true}

// Write renders raw (GET /status as the node sent it) to w.
func Write(w io.Writer, raw map[string]any) error {
	var view struct {
		Nodes  []api.NodeView  `json:"nodes"`
		Quorum *api.QuorumView `json:"quorum"`
	}
	b, _ := json.Marshal(raw)
	json.Unmarshal(b, &view) // absent (an older node): no table
	role, _ := raw["role"].(string)
	if len(view.Nodes) > 0 {
		fmt.Fprintln(w, "Cluster:")
		tw := tabwriter.NewWriter(w, 2, 8, 2, ' ', 0)
		fmt.Fprintln(tw, "  NODE\tROLE\tGENERATION\tPROTECTION\tEPOCH LAG\tREACHABLE\tLAST CONTACT (raft / data)\t")
		for _, n := range view.Nodes {
			id := n.ID
			contact := fmt.Sprintf("%s / %s", msOrDash(n.RaftLastContactMs), msOrDash(n.DataLastContactMs))
			if n.Self {
				id += " (this node)"
				contact = "-"
			}
			fmt.Fprintf(tw, "  %s\t%s\t%d\t%s\t%s\t%s\t%s\t\n", id, orDash(n.Role), n.Generation,
				boolWord(n.Protected, "protected", "UNPROTECTED"), intOrDash(n.EpochLag), boolWord(n.Reachable, "yes", "NO"), contact)
		}
		tw.Flush()
		fmt.Fprintln(w, "  (last contact: how long ago this node last heard from each, over raft and over the data link; - never or not known)")
	}
	if q := view.Quorum; q != nil {
		state := "has quorum"
		if !q.HasQuorum {
			state = "NO QUORUM"
		}
		fmt.Fprintf(w, "Quorum: %s: %d of %d voters reachable (%d needed), raft leader %s\n", state, q.Reachable, q.Voters, q.Needed, orDash(q.Leader))
		fmt.Fprintf(w, "One more failure: %s\n", q.OneMoreFailure)
	}
	var rs struct {
		Resync *api.ResyncStatus `json:"resync"`
	}
	json.Unmarshal(b, &rs)
	if r := rs.Resync; r != nil {
		fmt.Fprintf(w, "Catching up the secondary %s: %s, %d of %d pages (%.0f%%), %s sent, for %s\n", r.Secondary, r.Phase,
			r.PagesDone, r.PagesTotal, r.Percent, bytesIEC(r.BytesSent), time.Duration(r.ElapsedMs)*time.Millisecond)
	}
	writePostcopyAlert(w, raw)
	fmt.Fprintf(w, "\nThis node (%s):\n", orDash(role))
	writeDetail(w, raw)
	return nil
}

func msOrDash(p *int64) string {
	if p == nil {
		return "-"
	}
	return (time.Duration(*p) * time.Millisecond).String()
}

func bytesIEC(n uint64) string {
	switch {
	case n >= 1<<30:
		return fmt.Sprintf("%.1f GiB", float64(n)/(1<<30))
	case n >= 1<<20:
		return fmt.Sprintf("%.1f MiB", float64(n)/(1<<20))
	case n >= 1<<10:
		return fmt.Sprintf("%.1f KiB", float64(n)/(1<<10))
	}
	return fmt.Sprintf("%d B", n)
}

// writeDetail prints the node's own fields, sorted, leaving out the
// cluster part and figures that are zero (a primary's 20 migration
// fields are 0 unless it migrates).
func writeDetail(w io.Writer, raw map[string]any) {
	keys := make([]string, 0, len(raw))
	for k, v := range raw {
		if !clusterKeys[k] && !zero(v) {
			keys = append(keys, k)
		}
	}
	sort.Strings(keys)
	for _, k := range keys {
		v := raw[k]
		switch v.(type) {
		case map[string]any, []any:
			b, _ := json.Marshal(v)
			fmt.Fprintf(w, "  %-24s %s\n", k, b)
		default:
			fmt.Fprintf(w, "  %-24s %v\n", k, v)
		}
	}
	if c, ok := raw["cluster"].(map[string]any); ok {
		if img, _ := c["image"].(string); img != "" {
			fmt.Fprintf(w, "  %-24s %s\n", "image", img)
		}
		if why, _ := c["waiting_reason"].(string); why != "" {
			fmt.Fprintf(w, "  %-24s %s\n", "waiting_reason", why)
		}
	}
}

// zero is a JSON value that says nothing: 0, "", false, null, or an
// object whose every value is zero.
func zero(v any) bool {
	switch x := v.(type) {
	case nil:
		return true
	case float64:
		return x == 0
	case string:
		return x == ""
	case bool:
		return !x
	case []any:
		return len(x) == 0
	case map[string]any:
		for _, e := range x {
			if !zero(e) {
				return false
			}
		}
		return true
	}
	return false
}

func orDash(s string) string {
	if strings.TrimSpace(s) == "" {
		return "-"
	}
	return s
}

func boolWord(b *bool, yes, no string) string {
	switch {
	case b == nil:
		return "-"
	case *b:
		return yes
	}
	return no
}

func intOrDash(p *int) string {
	if p == nil {
		return "-"
	}
	return fmt.Sprint(*p)
}
