package homeserver

import (
	"crypto/rand"
	"crypto/subtle"
	"encoding/base64"
	"fmt"
	"strings"

	"golang.org/x/crypto/argon2"
)

// PasswordParams are the argon2id costs of new password hashes. Hashes
// carry their own parameters, so changing these never locks anyone out:
// a login with an older hash rehashes it.
type PasswordParams struct {
	Time      uint32 // passes (default 2)
	MemoryKiB uint32 // memory (default 19456, OWASP's minimum for argon2id)
	Threads   uint8  // parallelism (default 1)
}

func (p PasswordParams) withDefaults() PasswordParams {
	if p.Time == 0 {
		p.Time = 2
	}
	if p.MemoryKiB == 0 {
		p.MemoryKiB = 19456
	}
	if p.Threads == 0 {
		p.Threads = 1
	}
	return p
}

func (p PasswordParams) encode() string {
	return fmt.Sprintf("m=%d,t=%d,p=%d", p.MemoryKiB, p.Time, p.Threads)
}

// hashPassword returns the PHC string of an argon2id hash of pw.
func hashPassword(pw string, p PasswordParams) string {
	salt := make([]byte, 16)
	_, _ = rand.Read(salt)
	key := argon2.IDKey([]byte(pw), salt, p.Time, p.MemoryKiB, p.Threads, 32)
	b64 := base64.RawStdEncoding
	return fmt.Sprintf("$argon2id$v=%d$%s$%s$%s", argon2.Version, p.encode(), b64.EncodeToString(salt), b64.EncodeToString(key))
}

// checkPassword compares pw with a stored hash in constant time. ok is
// false for an empty stored value (users an AS registered have none).
// rehash is true when the hash should be replaced with one of the current
// parameters: an unsalted SHA-256 of the unversioned stub, or an argon2id
// hash of other costs.
func checkPassword(stored, pw string, p PasswordParams) (ok, rehash bool) {
	switch {
	case stored == "":
		return false, false
	case strings.HasPrefix(stored, "$argon2id$"):
		parts := strings.Split(stored, "$") // "", argon2id, v=19, m=..,t=..,p=.., salt, key
		if len(parts) != 6 || parts[2] != fmt.Sprintf("v=%d", argon2.Version) {
			return false, false
		}
		var old PasswordParams
		if _, err := fmt.Sscanf(parts[3], "m=%d,t=%d,p=%d", &old.MemoryKiB, &old.Time, &old.Threads); err != nil || old.Time == 0 || old.Threads == 0 {
			return false, false
		}
		b64 := base64.RawStdEncoding
		salt, err1 := b64.DecodeString(parts[4])
		key, err2 := b64.DecodeString(parts[5])
		if err1 != nil || err2 != nil || len(key) == 0 {
			return false, false
		}
		got := argon2.IDKey([]byte(pw), salt, old.Time, old.MemoryKiB, old.Threads, uint32(len(key)))
		ok = subtle.ConstantTimeCompare(got, key) == 1
		return ok, ok && old != p
	case len(stored) == 64:
		// The unversioned stub's unsalted SHA-256; migration 2 cleared the
		// empty password of AS users, and registration never allowed one.
		ok = subtle.ConstantTimeCompare([]byte(stored), []byte(tokenHash(pw))) == 1
		return ok, ok
	}
	return false, false
}
