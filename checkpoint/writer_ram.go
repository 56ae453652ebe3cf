package checkpoint

import (
	"bytes"
	"encoding/binary"
	"fmt"
	"hash/crc32"
	"sync"

	"github.com/cespare/xxhash/v2"
	"github.com/tandemvm/tandem/guest"
)

// ramSection is one RAM section on its way to the sink, in three steps:
// classify (each page's encoding, the XOR deltas, the cache) in stream
// order on the calling goroutine; finish (page hashes, body, compression,
// frame and CRC), which touches nothing shared and may run on another
// goroutine; commit (the epoch digest, the write) in stream order.
type ramSection struct {
	ents []entry
	// pages are the section's pages as the caller gave them (valid
	// during the call); zero and hashes are their digest records, in
	// the same order.
	pages []Page
	zero  []bool
	// late marks the stored pages: finish hashes them as it takes their
	// CRC, each page read once while it is in the CPU's cache.
	late   []bool
	hashes []uint64
	deltas []byte
	body   []byte
	out    []byte
	stored [][]byte
	// storedPos is each stored page's position in pages.
	storedPos []int
	tail      [][]byte // stored pages written from the caller's memory
	tailN     int
	counts    PageCounts
}

// writePages encodes pages, at most BatchPages to a section. With more
// than one encoder and more than one section, sections are finished on
// up to Encoders goroutines while the caller classifies the next ones and
// writes the finished ones in order; every goroutine has ended, and no
// page is read any more, when it returns.
func (w *Writer) writePages(pages []Page) error {
	w.endStaleBypass()
	n := (len(pages) + w.batch - 1) / w.batch
	for len(w.secs) < max(1, min(n, w.encoders+1)) {
		w.secs = append(w.secs, &ramSection{})
	}
	if w.encoders <= 1 || n <= 1 {
		s := w.secs[0]
		for len(pages) > 0 {
			k := min(len(pages), w.batch)
			w.classify(s, pages[:k])
			w.finish(s)
			if err := w.commit(s); err != nil {
				return err
			}
			pages = pages[k:]
		}
		return nil
	}
	// Pipeline: at most len(w.secs) sections in flight, section i in
	// w.secs[i%len]; the caller classifies, workers finish, the caller
	// commits in order.
	slots := len(w.secs)
	work := make(chan int, slots)
	done := make([]chan struct{}, n)
	for i := range done {
		done[i] = make(chan struct{})
	}
	var wg sync.WaitGroup
	for range min(w.encoders, n) {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := range work {
				w.finish(w.secs[i%slots])
				close(done[i])
			}
		}()
	}
	var err error
	next := 0 // next section to commit
	commit := func() {
		<-done[next]
		if err == nil {
			err = w.commit(w.secs[next%slots])
		}
		next++
	}
	for i := 0; i < n; i++ {
		if i-next == slots {
			commit() // frees the slot section i reuses
		}
		lo := i * w.batch
		w.classify(w.secs[i%slots], pages[lo:min(lo+w.batch, len(pages))])
		work <- i
	}
	close(work)
	for next < n {
		commit()
	}
	wg.Wait()
	return err
}

// classify chooses each page's encoding (zero run, repeat run, XOR delta
// against the cache, raw or stored) and updates the cache as the receiver
// will see it.
func (w *Writer) classify(s *ramSection, pages []Page) {
	ents := s.ents[:0]
	zero := s.zero[:0]
	late := s.late[:0]
	s.pages = pages
	s.deltas = s.deltas[:0]
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
			zero = append(zero, true)
			late = append(late, false)
			if next && last.enc == encZero {
				last.count++
			} else {
				ents = append(ents, entry{index: idx, count: 1, enc: encZero})
			}
			continue
		}
		zero = append(zero, false)
		late = append(late, false)
		if w.feat.runPages && next && (last.enc == encRaw || last.enc == encStored || last.enc == encRun) && bytes.Equal(last.data, data) {
			if last.enc == encStored {
				late[last.page] = false // now in the body: hashed with the others
			}
			last.enc = encRun
			last.count++
			w.remember(p)
			continue
		}
		if base := w.deltaBase(idx); base != nil {
			mark := len(s.deltas)
			d, ok := appendXORDelta(s.deltas, data, base)
			w.noteDelta(ok)
			if ok {
				s.deltas = d
				ents = append(ents, entry{index: idx, count: 1, enc: encXOR, dOff: mark, dEnd: len(d)})
				w.remember(p)
				continue
			}
			s.deltas = d[:mark]
		}
		// Without compression every page is stored: the section's tail
		// is written from the caller's memory (no copy into the body),
		// and the bytes on the wire are the same as raw.
		enc := uint8(encRaw)
		if w.feat.storedPages && (!compress || looksIncompressible(data)) {
			enc = encStored
			late[len(late)-1] = true
		}
		ents = append(ents, entry{index: idx, count: 1, enc: enc, data: data, page: len(zero) - 1})
		w.remember(p)
	}
	s.ents, s.zero, s.late = ents, zero, late
}

// remember records p as the receiver's copy of its page in the delta
// cache, unless the caller said no delta will be based on it
// (SkipCacheBelow).
func (w *Writer) remember(p Page) {
	if w.bypass > 0 {
		w.bypass--
		w.cache.invalidate(p.Index)
		return
	}
	if p.Index < w.noCacheBelow {
		w.cache.invalidate(p.Index)
		return
	}
	w.cache.put(p.Index, p.Data)
}

// finish hashes the pages for the digest and serialises the entries, the
// entry stream (compressed by the envelope) then the stored pages, as a
// framed RAM section. Page data is copied once at most on its way to the
// sink: without compression the body is built in the section itself, and
// a large tail of stored pages is written from the caller's memory (see
// sendSection). A stored page is hashed in the pass that takes the
// section's CRC, so it is read from memory once for both.
func (w *Writer) finish(s *ramSection) {
	hashes := s.hashes[:0]
	for i, p := range s.pages {
		var h uint64
		if !s.zero[i] && !s.late[i] {
			h = xxhash.Sum64(p.Data)
		}
		hashes = append(hashes, h)
	}
	s.hashes = hashes
	out := append(s.out[:0], make([]byte, frameLen)...)
	if w.enc == nil {
		n := s.bodyLen()
		out = append(out, codecNone)
		out = binary.AppendUvarint(out, n)
		out = binary.AppendUvarint(out, n)
		mark := len(out)
		out, s.counts = s.appendBody(out)
		if uint64(len(out)-mark) != n {
			panic(fmt.Sprintf("checkpoint: RAM body of %d bytes, %d announced", len(out)-mark, n))
		}
	} else {
		s.body, s.counts = s.appendBody(s.body[:0])
		out = w.appendEnvelope(out, s.body)
	}
	stored, pos := s.stored[:0], s.storedPos[:0]
	for i := range s.ents {
		if s.ents[i].enc == encStored {
			stored = append(stored, s.ents[i].data)
			pos = append(pos, s.ents[i].page)
		}
	}
	s.stored, s.storedPos = stored, pos
	s.out, s.tail, s.tailN = frameSection(SectionRAM, out, stored, func(j int, page []byte) {
		s.hashes[pos[j]] = xxhash.Sum64(page)
	})
}

// commit records a finished section in the epoch digest and its figures,
// and writes it.
func (w *Writer) commit(s *ramSection) error {
	for i, p := range s.pages {
		if s.zero[i] {
			w.digest.zero(p.Index)
		} else {
			w.digest.pageHash(p.Index, s.hashes[i])
		}
		if w.onPageHash != nil {
			w.onPageHash(p.Index, s.hashes[i], s.zero[i])
		}
	}
	s.pages = nil // the caller's
	w.cur.Encodings = w.cur.Encodings.Plus(s.counts)
	w.cur.Pages += s.counts.Total()
	w.cur.ZeroPages += s.counts.Zero
	w.cur.DeltaPages += s.counts.XOR
	w.cur.InputBytes += s.counts.Total() * guest.PageSize
	return w.sendSection(SectionRAM, s.out, s.tail, s.tailN)
}

// appendBody appends the entry stream to body and counts the pages by
// encoding.
func (s *ramSection) appendBody(body []byte) ([]byte, PageCounts) {
	body = binary.AppendUvarint(body, uint64(len(s.ents)))
	var expected uint64
	var counts PageCounts
	for i := range s.ents {
		e := &s.ents[i]
		body = binary.AppendVarint(body, int64(e.index-expected))
		body = append(body, e.enc)
		switch e.enc {
		case encZero:
			body = binary.AppendUvarint(body, e.count)
		case encRaw:
			body = append(body, e.data...)
		case encXOR:
			body = append(body, s.deltas[e.dOff:e.dEnd]...)
		case encRun:
			body = binary.AppendUvarint(body, e.count)
			body = append(body, e.data...)
		}
		counts.add(e.enc, e.count)
		expected = e.index + e.count
	}
	return body, counts
}

// bodyLen is the length appendBody gives.
func (s *ramSection) bodyLen() uint64 {
	n := uvarintLen(uint64(len(s.ents)))
	var expected uint64
	for i := range s.ents {
		e := &s.ents[i]
		n += varintLen(int64(e.index-expected)) + 1
		switch e.enc {
		case encZero:
			n += uvarintLen(e.count)
		case encRaw:
			n += guest.PageSize
		case encXOR:
			n += e.dEnd - e.dOff
		case encRun:
			n += uvarintLen(e.count) + guest.PageSize
		}
		expected = e.index + e.count
	}
	return uint64(n)
}

func uvarintLen(v uint64) int {
	var b [binary.MaxVarintLen64]byte
	return binary.PutUvarint(b[:], v)
}

func varintLen(v int64) int {
	var b [binary.MaxVarintLen64]byte
	return binary.PutVarint(b[:], v)
}

// CachePages is how many pages the delta cache holds (0: no cache). The
// cache is direct-mapped by page index, so a pass over memory in page
// order keeps, of the pages it puts, only those no page CachePages
// further on replaces.
func (w *Writer) CachePages() uint64 {
	if w.cache == nil {
		return 0
	}
	return w.cache.slots
}

// OnPageHash makes f see every page the Writer encodes from now on, in
// stream order, as its section is written: its index, the XXH64 the
// epoch digest records for it, and whether it is all zero (sum is then
// 0). f runs on the goroutine that called WritePages, before that call
// returns. A caller keeping a digest of what the receiver holds
// (guest.MemHash.UpdateHashed) so hashes nothing again. nil stops it.
func (w *Writer) OnPageHash(f func(index, sum uint64, zero bool)) { w.onPageHash = f }

// SkipCacheBelow tells the Writer that no delta will be based on the
// version it is given of any page with an index below index (a later
// page of the same pass takes its cache slot, say), until the next call:
// it does not copy those pages into its delta cache, and forgets any
// copy it held. Correct whatever the index; it saves a copy per page.
// 0 caches every page again.
func (w *Writer) SkipCacheBelow(index uint64) { w.noCacheBelow = index }

// frameSection fills in the frame of out, whose payload continues with
// the pages of tail (n bytes). A tail under directTail is appended to out
// (and nil, 0 returned for it); a larger one stays where it lies, to be
// written from there by sendSection. each, if set, sees every page of
// tail (its position and bytes) as the CRC takes it, so a caller can
// read each page from memory once for both.
func frameSection(t SectionType, out []byte, tail [][]byte, each func(int, []byte)) ([]byte, [][]byte, int) {
	n := 0
	for _, p := range tail {
		n += len(p)
	}
	if n < directTail {
		for j, p := range tail {
			if each != nil {
				each(j, p)
			}
			out = append(out, p...)
		}
		tail, n = nil, 0
	}
	payload := len(out) - frameLen + n
	out[0] = byte(t)
	binary.LittleEndian.PutUint32(out[1:], uint32(payload))
	crc := crc32.Update(crc32.Checksum(out[:5], castagnoli), castagnoli, out[frameLen:])
	for j, p := range tail {
		if each != nil {
			each(j, p)
		}
		crc = crc32.Update(crc, castagnoli, p)
	}
	binary.LittleEndian.PutUint32(out[5:], crc)
	return out, tail, n
}
