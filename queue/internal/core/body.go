package core

import (
	"hash/crc32"

	"github.com/asdispatch/asdispatch/txnstore"
)

// Format says how a transaction body is laid out for one AS. It is stored
// with each frozen transaction so that a body rebuilt after a restart is laid
// out exactly as the first one, whatever the registration says by then.
type Format uint32

// Format bits.
const (
	// EphemeralStable puts ephemeral items under "ephemeral" (Matrix v1.13).
	EphemeralStable Format = 1 << iota
	// EphemeralUnstable puts them under "de.sorunome.msc2409.ephemeral" too,
	// for ASes registered with an unstable flag (matrix-appservice-node reads
	// only that key).
	EphemeralUnstable
)

var castagnoli = crc32.MakeTable(crc32.Castagnoli)

// checksum is the CRC-32C of a body, stored with a frozen transaction.
func checksum(body []byte) uint32 { return crc32.Checksum(body, castagnoli) }

// limits caps one transaction.
type limits struct {
	events, ephemeral, toDevice, bytes int
	// keys caps the device list items and, apart, the key counts items.
	// They are counted before coalescing, so a body never holds more.
	keys int
}

// bodyOverhead bounds the bytes a body adds around its items: the keys,
// brackets and braces of every array. Commas are counted per item.
const bodyOverhead = 128

// cut returns how many of items (oldest first) fit in one transaction. It
// stops at the first item that does not fit, so a transaction always covers a
// contiguous range of the stream. The first item is always taken: an item
// larger than the byte cap travels alone.
func cut(items []txnstore.Item, lim limits, f Format) int {
	ephCopies := 1
	if f&EphemeralStable != 0 && f&EphemeralUnstable != 0 {
		ephCopies = 2
	}
	var nEv, nEph, nTD, nDL, nKC int
	size := bodyOverhead
	for i, it := range items {
		switch it.Kind {
		case txnstore.KindEphemeral:
			nEph++
			size += (ephCopies - 1) * (len(it.Data) + 1)
		case txnstore.KindToDevice:
			nTD++
		case txnstore.KindDeviceList:
			nDL++
		case txnstore.KindKeyCounts:
			nKC++
			size += (keyCountsFactor - 1) * (len(it.Data) + 1)
		default:
			nEv++
		}
		if (it.Kind == txnstore.KindDeviceList || it.Kind == txnstore.KindKeyCounts) && nDL+nKC == 1 {
			size += msc3202Overhead
		}
		size += len(it.Data) + 1
		if i > 0 && (nEv > lim.events || nEph > lim.ephemeral || nTD > lim.toDevice ||
			nDL > lim.keys || nKC > lim.keys || size > lim.bytes) {
			return i
		}
	}
	return len(items)
}

// encode lays items out as a transaction body. It never decodes or
// re-encodes an event, ephemeral or to-device item: each one's bytes are
// copied once into the body. Device list and key counts items are
// coalesced (keys.go). The body depends only on items and f.
func encode(items []txnstore.Item, f Format) []byte {
	size := bodyOverhead
	var nEph, nTD, nDL, nKC int
	for _, it := range items {
		size += len(it.Data) + 1
		switch it.Kind {
		case txnstore.KindEphemeral:
			nEph++
		case txnstore.KindToDevice:
			nTD++
		case txnstore.KindDeviceList:
			nDL++
		case txnstore.KindKeyCounts:
			nKC++
			size += (keyCountsFactor - 1) * (len(it.Data) + 1)
		}
	}
	if nDL+nKC > 0 {
		size += msc3202Overhead
	}
	if f&EphemeralStable != 0 && f&EphemeralUnstable != 0 {
		for _, it := range items {
			if it.Kind == txnstore.KindEphemeral {
				size += len(it.Data) + 1
			}
		}
	}
	b := make([]byte, 0, size)
	b = append(b, `{"events":`...)
	b = appendArray(b, items, txnstore.KindEvent)
	if nEph > 0 {
		// An AS whose format names neither key still gets its items (it
		// had opted in when they were queued): under the stable key.
		if f&EphemeralStable != 0 || f&EphemeralUnstable == 0 {
			b = append(b, `,"ephemeral":`...)
			b = appendArray(b, items, txnstore.KindEphemeral)
		}
		if f&EphemeralUnstable != 0 {
			b = append(b, `,"de.sorunome.msc2409.ephemeral":`...)
			b = appendArray(b, items, txnstore.KindEphemeral)
		}
	}
	if nTD > 0 {
		// MSC4203's key as Synapse and mautrix-go spell it today.
		b = append(b, `,"de.sorunome.msc2409.to_device":`...)
		b = appendArray(b, items, txnstore.KindToDevice)
	}
	if nDL > 0 {
		b = appendDeviceLists(b, items)
	}
	if nKC > 0 {
		b = appendKeyCounts(b, items)
	}
	return append(b, '}')
}

func appendArray(b []byte, items []txnstore.Item, k txnstore.Kind) []byte {
	b = append(b, '[')
	first := true
	for _, it := range items {
		if it.Kind != k {
			continue
		}
		if !first {
			b = append(b, ',')
		}
		first = false
		b = append(b, it.Data...)
	}
	return append(b, ']')
}
