package checkpoint

import (
	"fmt"

	"github.com/cespare/xxhash/v2"

	"github.com/tandemvm/tandem/guest"
)

// ram decodes a RAM section into r.ents (validating everything and
// computing XOR results into scratch pages), then applies it.
func (r *Reader) ram(t Target, s *Section) error {
	maxPages := uint64(r.lim.MaxPagesPerBatch)
	maxRaw := maxPages*(guest.PageSize+24) + 16
	body, tail, err := r.envelope(maxRaw, s)
	if err != nil {
		return err
	}
	total, err := r.decodeRAM(t, s, body, tail, maxPages)
	if err != nil {
		return err
	}
	s.RawSize = int64(total) * guest.PageSize
	return r.applyRAM(t)
}

// decodeRAM checks and decodes every entry of a RAM section body into
// r.ents and returns the number of pages it covers. Nothing is applied.
func (r *Reader) decodeRAM(t Target, s *Section, body, tail []byte, maxPages uint64) (uint64, error) {
	d := decoder{b: body}
	n := d.uvarint()
	if d.err == nil && n > maxPages {
		return 0, fmt.Errorf("%w: %d entries (limit %d)", ErrTooLarge, n, maxPages)
	}
	ents := r.ents[:0]
	if len(r.overlay) > 0 {
		clear(r.overlay)
	}
	// The overlay (pages set earlier in this section, the bases of XOR
	// entries) is only built once an XOR entry needs it: a section of
	// whole pages costs no map operation per page.
	overlay := false
	var expected, total uint64
	used := 0
	for i := uint64(0); i < n && d.err == nil; i++ {
		e := decEntry{index: expected + uint64(d.varint()), count: 1, enc: d.u8()}
		if d.err != nil {
			break
		}
		if e.enc == encXOR && !overlay {
			overlay = true
			for _, pe := range ents {
				r.setOverlay(pe)
			}
		}
		var err error
		if tail, used, err = r.decodeEntry(t, &d, &e, tail, used); err != nil {
			return 0, err
		}
		if d.err != nil {
			break
		}
		if e.count == 0 || e.count > maxPages-total {
			return 0, fmt.Errorf("%w: entry of %d pages makes more than %d pages", ErrCorrupt, e.count, maxPages)
		}
		if !r.lay.contains(e.index, e.count) {
			return 0, fmt.Errorf("%w: pages %d+%d outside the memory layout", ErrCorrupt, e.index, e.count)
		}
		total += e.count
		expected = e.index + e.count
		if overlay {
			r.setOverlay(e)
		}
		ents = append(ents, e)
		s.Pages.add(e.enc, e.count)
	}
	r.ents = ents
	if d.err != nil {
		return 0, d.err
	}
	if len(d.b) != 0 || len(tail) != 0 {
		return 0, fmt.Errorf("%w: %d unused body bytes, %d unused stored bytes", ErrCorrupt, len(d.b), len(tail))
	}
	return total, nil
}

// setOverlay records e's pages as set earlier in the section. Runs and
// zero runs never serve as XOR bases in practice, but a stream may use
// them so; the overlay keeps decoding exact.
func (r *Reader) setOverlay(e decEntry) {
	data := e.data
	if data == nil {
		data = zeroPage[:]
	}
	for k := uint64(0); k < e.count; k++ {
		r.overlay[e.index+k] = data
	}
}

// decodeEntry reads the body of one entry whose header is in e, by its
// encoding. It returns the stored-page tail left and the scratch pages
// used so far.
func (r *Reader) decodeEntry(t Target, d *decoder, e *decEntry, tail []byte, used int) ([]byte, int, error) {
	switch e.enc {
	case encZero:
		e.count = d.uvarint()
	case encRaw:
		e.data = d.take(guest.PageSize)
	case encStored:
		if !r.feat.storedPages {
			return tail, used, fmt.Errorf("%w: stored page in a version without them", ErrCorrupt)
		}
		if len(tail) < guest.PageSize {
			return tail, used, fmt.Errorf("%w: stored page %d past the end of the section", ErrCorrupt, e.index)
		}
		e.data, tail = tail[:guest.PageSize:guest.PageSize], tail[guest.PageSize:]
	case encXOR:
		out := r.page(used)
		if err := r.xorPage(t, d, e.index, out); err != nil {
			return tail, used, err
		}
		e.data = out
		used++
	case encRun:
		if !r.feat.runPages {
			return tail, used, fmt.Errorf("%w: page run in a version without them", ErrCorrupt)
		}
		e.count = d.uvarint()
		e.data = d.take(guest.PageSize)
	default:
		return tail, used, fmt.Errorf("%w: unknown page encoding %d", ErrCorrupt, e.enc)
	}
	return tail, used, nil
}

// xorPage computes page index into out: its base (an earlier entry of
// this section, else the target's page, else zeros) XOR the delta at d.
func (r *Reader) xorPage(t Target, d *decoder, index uint64, out []byte) error {
	if !r.lay.contains(index, 1) {
		return fmt.Errorf("%w: page %d outside the memory layout", ErrCorrupt, index)
	}
	base, ok := r.overlay[index]
	if !ok && t != nil {
		var err error
		if base, err = t.PageBase(index); err != nil {
			return fmt.Errorf("base of page %d: %w", index, err)
		}
	}
	if base == nil {
		clear(out)
	} else if len(base) != guest.PageSize {
		return fmt.Errorf("target returned a base of %d bytes for page %d", len(base), index)
	} else {
		copy(out, base)
	}
	m := applyXORDelta(out, d.b)
	if m < 0 {
		return fmt.Errorf("%w: bad XOR delta for page %d", ErrCorrupt, index)
	}
	d.b = d.b[m:]
	return nil
}

// prefault tells pf each run of consecutive pages r.ents store.
func (r *Reader) prefault(pf Prefaulter) {
	var first, end uint64 // the run being gathered: [first, end)
	for _, e := range r.ents {
		if e.index == end && end > first {
			end += e.count
			continue
		}
		if end > first {
			pf.Prefault(first, end-first)
		}
		first, end = e.index, e.index+e.count
	}
	if end > first {
		pf.Prefault(first, end-first)
	}
}

// applyRAM stores the checked entries of r.ents into t and counts them.
func (r *Reader) applyRAM(t Target) error {
	r.cur.Sections++
	if pf, ok := t.(Prefaulter); ok {
		r.prefault(pf)
	}
	ht, hashed := t.(HashedTarget)
	if pb, ok := t.(PageBatcher); ok {
		pb.BatchPages()
		defer pb.FlushPages() // also on a failed store
	}
	for _, e := range r.ents {
		for k := uint64(0); k < e.count; k++ {
			idx := e.index + k
			data := e.data
			var sum uint64
			zero := e.enc == encZero || isZeroPage(data)
			if zero {
				data = zeroPage[:]
				r.digest.zero(idx)
			} else {
				sum = xxhash.Sum64(data)
				r.digest.pageHash(idx, sum)
			}
			var err error
			switch {
			case hashed:
				err = ht.StorePageHashed(idx, data, sum, zero)
			case t != nil:
				err = t.StorePage(idx, data)
			}
			if err != nil {
				return fmt.Errorf("store page %d: %w", idx, err)
			}
		}
		r.cur.Pages += e.count
		if e.enc == encZero {
			r.cur.ZeroPages += e.count
		}
		if e.enc == encXOR {
			r.cur.DeltaPages++
		}
	}
	return nil
}
