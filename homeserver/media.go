package homeserver

import (
	"errors"
	"fmt"
	"io"
	"mime"
	"net/http"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"time"
)

func (s *Server) mediaRoutes() []route {
	rs := []route{
		{"GET", v1 + "/media/config", user, s.mediaConfig},
		{"GET", mediaV3 + "/config", user, s.mediaConfig},
		{"POST", mediaV3 + "/upload", user, s.upload},
		{"POST", "/_matrix/media/v1/create", user, s.createMedia},
		{"PUT", mediaV3 + "/upload/{server}/{media}", user, s.upload},
	}
	// Thumbnails are served as the original file.
	for _, p := range []string{"download", "thumbnail"} {
		rs = append(rs,
			route{"GET", v1 + "/media/" + p + "/{server}/{media}", user, s.download},
			route{"GET", mediaV3 + "/" + p + "/{server}/{media}", public, s.download})
	}
	rs = append(rs,
		route{"GET", v1 + "/media/download/{server}/{media}/{name}", user, s.download},
		route{"GET", mediaV3 + "/download/{server}/{media}/{name}", public, s.download})
	return rs
}

func (s *Server) mediaConfig(*request) (any, error) {
	return map[string]int64{"m.upload.size": s.cfg.MaxUploadBytes}, nil
}

// validMediaID: media IDs are what createMedia makes, never a path.
func validMediaID(id string) bool {
	return id != "" && len(id) <= 64 && strings.Trim(id, "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_-") == ""
}

// createMedia reserves an mxc:// URI the caller uploads to later.
func (s *Server) createMedia(r *request) (any, error) {
	id := randomID(12)
	s.mu.Lock()
	defer s.mu.Unlock()
	if _, err := s.st.db.ExecContext(r.Context(), `INSERT INTO media (media_id, uploader, created) VALUES (?, ?, ?)`, id, r.c.userID, time.Now().UnixMilli()); err != nil {
		return nil, err
	}
	return map[string]any{"content_uri": "mxc://" + s.cfg.ServerName + "/" + id,
		"unused_expires_at": time.Now().Add(24 * time.Hour).UnixMilli()}, nil
}

// upload stores a file: a new one (POST) or one createMedia reserved (PUT,
// only by who reserved it, only once). Above MaxUploadBytes: 413.
func (s *Server) upload(r *request) (any, error) {
	ctx := r.Context()
	id := r.PathValue("media")
	if id != "" {
		if r.PathValue("server") != s.cfg.ServerName || !validMediaID(id) {
			return nil, errNotFound.With("unknown media")
		}
		var uploader string
		var uploaded bool
		ok, err := one(ctx, s.st.db, `SELECT uploader, uploaded FROM media WHERE media_id = ?`, []any{id}, &uploader, &uploaded)
		if err != nil {
			return nil, err
		}
		if !ok {
			return nil, errNotFound.With("unknown media")
		}
		if uploader != r.c.userID {
			return nil, errForbidden.With("this media ID was created by another user")
		}
		if uploaded {
			return nil, errOverwrite.With("media already uploaded")
		}
	}
	if r.ContentLength > s.cfg.MaxUploadBytes {
		return nil, errTooLarge.With("file is larger than %d bytes", s.cfg.MaxUploadBytes)
	}
	tmp, err := os.CreateTemp(s.mediaDir, "upload-*")
	if err != nil {
		return nil, err
	}
	defer os.Remove(tmp.Name())
	n, err := io.Copy(tmp, io.LimitReader(r.Body, s.cfg.MaxUploadBytes+1))
	if err == nil {
		err = tmp.Sync()
	}
	if cerr := tmp.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		return nil, fmt.Errorf("media upload: %w", err)
	}
	if n > s.cfg.MaxUploadBytes {
		return nil, errTooLarge.With("file is larger than %d bytes", s.cfg.MaxUploadBytes)
	}
	ctype := r.Header.Get("Content-Type")
	if ctype == "" {
		ctype = "application/octet-stream"
	}
	name := r.query("filename")
	s.mu.Lock()
	defer s.mu.Unlock()
	if id == "" {
		id = randomID(12)
		if _, err := s.st.db.ExecContext(ctx, `INSERT INTO media (media_id, uploader, created) VALUES (?, ?, ?)`, id, r.c.userID, time.Now().UnixMilli()); err != nil {
			return nil, err
		}
	} else {
		// Recheck under the lock: two PUTs to one ID race for it.
		var uploaded bool
		if _, err := one(ctx, s.st.db, `SELECT uploaded FROM media WHERE media_id = ?`, []any{id}, &uploaded); err != nil {
			return nil, err
		}
		if uploaded {
			return nil, errOverwrite.With("media already uploaded")
		}
	}
	if err := os.Rename(tmp.Name(), filepath.Join(s.mediaDir, id)); err != nil {
		return nil, fmt.Errorf("media upload: %w", err)
	}
	if _, err := s.st.db.ExecContext(ctx, `UPDATE media SET content_type = ?, filename = ?, size = ?, uploaded = 1 WHERE media_id = ?`, ctype, name, n, id); err != nil {
		return nil, err
	}
	if r.Method == http.MethodPut {
		return empty, nil
	}
	return map[string]string{"content_uri": "mxc://" + s.cfg.ServerName + "/" + id}, nil
}

type mediaFile struct {
	path, ctype, name string
	size              int64
}

func (m *mediaFile) writeTo(w http.ResponseWriter) {
	f, err := os.Open(m.path)
	if err != nil {
		writeJSON(w, http.StatusNotFound, map[string]string{"errcode": "M_NOT_FOUND", "error": "media not found"})
		return
	}
	defer f.Close()
	h := w.Header()
	h.Set("Content-Type", m.ctype)
	h.Set("Content-Length", strconv.FormatInt(m.size, 10))
	h.Set("Content-Security-Policy", "sandbox; default-src 'none'; script-src 'none'; plugin-types application/pdf; style-src 'unsafe-inline'; object-src 'self';")
	h.Set("Cross-Origin-Resource-Policy", "cross-origin")
	disp := "attachment"
	if strings.HasPrefix(m.ctype, "image/") || strings.HasPrefix(m.ctype, "video/") || strings.HasPrefix(m.ctype, "audio/") || strings.HasPrefix(m.ctype, "text/plain") {
		disp = "inline"
	}
	if m.name != "" {
		disp = mime.FormatMediaType(disp, map[string]string{"filename": m.name})
	}
	h.Set("Content-Disposition", disp)
	w.WriteHeader(http.StatusOK)
	_, _ = io.Copy(w, f)
}

// download serves a local file; thumbnails are the original file.
func (s *Server) download(r *request) (any, error) {
	id := r.PathValue("media")
	if r.PathValue("server") != s.cfg.ServerName || !validMediaID(id) {
		return nil, errNotFound.With("media not found")
	}
	m := &mediaFile{path: filepath.Join(s.mediaDir, id)}
	var uploaded bool
	ok, err := one(r.Context(), s.st.db, `SELECT content_type, filename, size, uploaded FROM media WHERE media_id = ?`, []any{id}, &m.ctype, &m.name, &m.size, &uploaded)
	if err != nil {
		return nil, err
	}
	if !ok {
		return nil, errNotFound.With("media not found")
	}
	if !uploaded {
		return nil, errNotYetUp.With("media not uploaded yet")
	}
	if n := r.PathValue("name"); n != "" {
		m.name = n
	}
	if _, err := os.Stat(m.path); errors.Is(err, os.ErrNotExist) {
		return nil, errNotFound.With("media not found")
	}
	return m, nil
}
