// Package pgdsn edits PostgreSQL connection strings.
package pgdsn

import "net/url"

// WithSearchPath returns dsn (a URL or key=value DSN) with its search_path
// set to schema.
func WithSearchPath(dsn, schema string) string {
	if u, err := url.Parse(dsn); err == nil && (u.Scheme == "postgres" || u.Scheme == "postgresql") {
		q := u.Query()
		q.Set("search_path", schema)
		u.RawQuery = q.Encode()
		return u.String()
	}
	return dsn + " search_path=" + schema
}
