package checkpoint

import (
	"bytes"
	"encoding/binary"

	"github.com/tandemvm/tandem/guest"
)

// writeBatch encodes pages as one RAM section.
func (w *Writer) writeBatch(pages []Page) error {
	w.entries = w.encodeEntries(pages)
	return w.emitRAM(w.entries)
}

// encodeEntries chooses each page's encoding (zero run, repeat run, XOR
// delta against the cache, raw or stored) and updates the cache and the
// digest as the receiver will see them.
func (w *Writer) encodeEntries(pages []Page) []entry {
	ents := w.entries[:0]
	w.deltas = w.deltas[:0]
	compress := w.enc != nil
	for _, p := range pages {
		idx, data := p.Index, p.Data
		var last *entry
		if len(ents) > 0 {
			last = &ents[len(ents)-1]
		}
		next := last != nil && last.index+last.count == idx
		if isZeroPage(data) {
			// The receiver's copy becomes zero; a zero base is not worth
			// a cache slot (raw plus zstd is as small as a delta).
			w.cache.invalidate(idx)
			w.digest.zero(idx)
			if next && last.enc == encZero {
				last.count++
			} else {
				ents = append(ents, entry{index: idx, count: 1, enc: encZero})
			}
			continue
		}
		w.digest.page(idx, data)
		if w.feat.runPages && next && (last.enc == encRaw || last.enc == encStored || last.enc == encRun) && bytes.Equal(last.data, data) {
			last.enc = encRun
			last.count++
			w.cache.put(idx, data)
			continue
		}
		if base := w.cache.get(idx); base != nil {
			mark := len(w.deltas)
			d, ok := appendXORDelta(w.deltas, data, base)
			if ok {
				w.deltas = d
				ents = append(ents, entry{index: idx, count: 1, enc: encXOR, dOff: mark, dEnd: len(d)})
				w.cache.put(idx, data)
				continue
			}
			w.deltas = d[:mark]
		}
		enc := uint8(encRaw)
		if compress && w.feat.storedPages && looksIncompressible(data) {
			enc = encStored
		}
		ents = append(ents, entry{index: idx, count: 1, enc: enc, data: data})
		w.cache.put(idx, data)
	}
	return ents
}

// emitRAM serialises ents, the entry stream (compressed by the envelope)
// then the stored pages, as a RAM section.
func (w *Writer) emitRAM(ents []entry) error {
	body := binary.AppendUvarint(w.body[:0], uint64(len(ents)))
	var expected uint64
	var counts PageCounts
	nstored := 0
	for i := range ents {
		e := &ents[i]
		body = binary.AppendVarint(body, int64(e.index-expected))
		body = append(body, e.enc)
		switch e.enc {
		case encZero:
			body = binary.AppendUvarint(body, e.count)
		case encRaw:
			body = append(body, e.data...)
		case encStored:
			nstored++
		case encXOR:
			body = append(body, w.deltas[e.dOff:e.dEnd]...)
		case encRun:
			body = binary.AppendUvarint(body, e.count)
			body = append(body, e.data...)
		}
		counts.add(e.enc, e.count)
		expected = e.index + e.count
	}
	w.body = body
	out := w.beginSection()
	out = w.appendEnvelope(out, body)
	for i := range ents {
		if ents[i].enc == encStored {
			out = append(out, ents[i].data...)
		}
	}
	w.cur.Encodings = w.cur.Encodings.Plus(counts)
	w.cur.Pages += counts.Total()
	w.cur.ZeroPages += counts.Zero
	w.cur.DeltaPages += counts.XOR
	w.cur.InputBytes += counts.Total() * guest.PageSize
	return w.endSection(SectionRAM, out)
}
