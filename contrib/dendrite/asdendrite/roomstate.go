package asdendrite

import (
	"context"
	"fmt"

	roomserverAPI "github.com/matrix-org/dendrite/roomserver/api"
	"github.com/matrix-org/dendrite/setup/config"
	"github.com/matrix-org/gomatrixserverlib"
	"github.com/matrix-org/gomatrixserverlib/spec"
	"github.com/matrix-org/util"
)

// roomState answers the dispatcher's questions about a room from Dendrite's
// roomserver: its local joined members and its directory aliases.
type roomState struct {
	rs     roomserverAPI.AppserviceRoomserverAPI
	global *config.Global
}

func (r roomState) JoinedLocalMembers(ctx context.Context, roomID string) ([]string, error) {
	var res roomserverAPI.QueryMembershipsForRoomResponse
	if err := r.rs.QueryMembershipsForRoom(ctx, &roomserverAPI.QueryMembershipsForRoomRequest{
		RoomID: roomID, JoinedOnly: true, LocalOnly: true,
	}, &res); err != nil {
		return nil, fmt.Errorf("joined members of %s: %w", roomID, err)
	}
	members := make([]string, 0, len(res.JoinEvents))
	for _, ev := range res.JoinEvents {
		if ev.StateKey != nil && r.IsLocalUser(*ev.StateKey) {
			members = append(members, *ev.StateKey)
		}
	}
	return members, nil
}

func (r roomState) LocalAliases(ctx context.Context, roomID string) ([]string, error) {
	var res roomserverAPI.GetAliasesForRoomIDResponse
	if err := r.rs.GetAliasesForRoomID(ctx, &roomserverAPI.GetAliasesForRoomIDRequest{RoomID: roomID}, &res); err != nil {
		return nil, fmt.Errorf("aliases of %s: %w", roomID, err)
	}
	return res.Aliases, nil
}

func (r roomState) IsLocalUser(userID string) bool {
	u, err := spec.NewUserID(userID, true)
	if err != nil {
		return false
	}
	return r.global.IsLocalServerName(u.Domain())
}

// AliasWatcher is the roomserver API the client API is given: the same
// roomserver, telling the dispatcher after every change of a room's
// directory aliases, the only aliases interest looks at, and letting the
// ASes know about an invitee first.
type AliasWatcher struct {
	roomserverAPI.RoomserverInternalAPI
	Invalidate func(roomID string)
	// BeforeInvite, if set, runs before every invite the client API makes,
	// with the invitee.
	BeforeInvite func(ctx context.Context, invitee spec.UserID)
}

// PerformInvite calls BeforeInvite, then invites.
func (w AliasWatcher) PerformInvite(ctx context.Context, req *roomserverAPI.PerformInviteRequest) error {
	if w.BeforeInvite != nil {
		w.BeforeInvite(ctx, req.InviteInput.Invitee)
	}
	return w.RoomserverInternalAPI.PerformInvite(ctx, req)
}

// SetRoomAlias sets the alias, then invalidates the room's interest.
func (w AliasWatcher) SetRoomAlias(ctx context.Context, senderID spec.SenderID, roomID spec.RoomID, alias string) (bool, error) {
	exists, err := w.RoomserverInternalAPI.SetRoomAlias(ctx, senderID, roomID, alias)
	if err == nil && !exists {
		w.Invalidate(roomID.String())
	}
	return exists, err
}

// RemoveRoomAlias removes the alias, then invalidates the room it pointed
// to (looked up first: the removal forgets it).
func (w AliasWatcher) RemoveRoomAlias(ctx context.Context, senderID spec.SenderID, alias string) (bool, bool, error) {
	var room roomserverAPI.GetRoomIDForAliasResponse
	lookupErr := w.RoomserverInternalAPI.GetRoomIDForAlias(ctx, &roomserverAPI.GetRoomIDForAliasRequest{Alias: alias}, &room)
	found, removed, err := w.RoomserverInternalAPI.RemoveRoomAlias(ctx, senderID, alias)
	if err == nil && removed && lookupErr == nil && room.RoomID != "" {
		w.Invalidate(room.RoomID)
	}
	return found, removed, err
}

// PerformCreateRoom creates the room, then invalidates it: the roomserver
// sets the room's alias itself once the creation events are in, so the
// dispatcher may have read the directory before the alias existed.
func (w AliasWatcher) PerformCreateRoom(ctx context.Context, userID spec.UserID, roomID spec.RoomID, req *roomserverAPI.PerformCreateRoomRequest) (string, *util.JSONResponse) {
	alias, jerr := w.RoomserverInternalAPI.PerformCreateRoom(ctx, userID, roomID, req)
	w.Invalidate(roomID.String())
	return alias, jerr
}

// PerformRoomUpgrade upgrades the room, moving its aliases to the new room:
// both rooms are invalidated.
func (w AliasWatcher) PerformRoomUpgrade(ctx context.Context, roomID string, userID spec.UserID, v gomatrixserverlib.RoomVersion) (string, error) {
	newRoom, err := w.RoomserverInternalAPI.PerformRoomUpgrade(ctx, roomID, userID, v)
	w.Invalidate(roomID)
	if newRoom != "" {
		w.Invalidate(newRoom)
	}
	return newRoom, err
}
