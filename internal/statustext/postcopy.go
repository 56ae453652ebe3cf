package statustext

import (
	"fmt"
	"io"
	"strings"
	"time"
)

// writePostcopyAlert puts a post-copy's trouble above the node's
// detail, where an operator looks first: on a destination, its source
// unreachable (the guest cannot run past a missing page), or the guest
// declared lost; on a source, its link to the destination lost (the
// post-copy paused). Nothing when none.
func writePostcopyAlert(w io.Writer, raw map[string]any) {
	str := func(k string) string { s, _ := raw[k].(string); return s }
	num := func(k string) float64 { f, _ := raw[k].(float64); return f }
	id, src := str("migration_id"), str("postcopy_source")
	switch {
	case str("postcopy_abandoned_at") != "":
		fmt.Fprintf(w, "\nGUEST LOST: post-copy migration %s from %s was abandoned at %s: %.0f pages never arrived; nothing of the guest runs here\n",
			id, orDash(src), str("postcopy_abandoned_at"), num("postcopy_remaining_pages"))
	case str("postcopy_source_unreachable_since") != "":
		var blocked []string
		waits, _ := raw["postcopy_waiting_ms"].([]any)
		for v, x := range waits {
			if ms, _ := x.(float64); ms > 0 {
				blocked = append(blocked, fmt.Sprintf("vCPU %d for %v", v, time.Duration(ms)*time.Millisecond))
			}
		}
		who := "none yet"
		if len(blocked) > 0 {
			who = strings.Join(blocked, ", ")
		}
		fmt.Fprintf(w, "\nPOST-COPY SOURCE UNREACHABLE: %s, since %s (%v): %.0f pages exist only there; blocked on a missing page: %s\n",
			orDash(src), str("postcopy_source_unreachable_since"), time.Duration(num("postcopy_source_unreachable_ms"))*time.Millisecond,
			num("postcopy_remaining_pages"), who)
		fmt.Fprintf(w, "  source back: tandem migrate --resume --from %s --id %s; source gone: tandem migrate --abandon --to <this API> --id %s\n", orDash(src), id, id)
	case str("status") == "postcopy-paused" && str("postcopy_link_down_since") != "":
		fmt.Fprintf(w, "\nPOST-COPY PAUSED: migration %s committed; the link to the destination %s is lost since %s (%s): the guest runs there and waits for the %.0f pages this paused copy holds\n",
			id, orDash(str("destination")), str("postcopy_link_down_since"), str("postcopy_link_error"), num("postcopy_remaining_pages"))
		fmt.Fprintf(w, "  link back: tandem migrate --resume --from <this API> --id %s\n", id)
	}
}
