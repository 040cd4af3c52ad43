package queue

import "github.com/asdispatch/asdispatch/queue/internal/core"

// DeviceListData is the Data of a txnstore.KindDeviceList item: userID's
// devices or keys changed, or (left) the AS's users no longer share a room
// with userID. A body carries each user once, as its latest item says.
func DeviceListData(userID string, left bool) []byte { return core.DeviceListData(userID, left) }

// KeyCountsData is the Data of a txnstore.KindKeyCounts item: one device's
// unclaimed one-time keys per algorithm and the algorithms of its unused
// fallback keys. A body carries the latest item of each device.
func KeyCountsData(userID, deviceID string, otk map[string]int, fallback []string) []byte {
	return core.KeyCountsData(userID, deviceID, otk, fallback)
}

// Fields lists the body keys a transaction may carry for an AS with format
// f that receives to-device messages (or not) and opted in to MSC3202 (or
// not), in body order. A key is left out of a body without items for it.
func Fields(f Format, toDevice, msc3202 bool) []string { return core.Fields(f, msc3202, toDevice) }
