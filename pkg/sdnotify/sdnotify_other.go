//go:build !linux

package sdnotify

import (
	"errors"
	"fmt"
)

var errNotLinux = errors.New("sd_notify is only implemented on Linux")

func send(addr, _ string) error {
	if err := checkAddr(addr); err != nil {
		return err
	}
	return fmt.Errorf("NOTIFY_SOCKET=%q: %w", addr, errNotLinux)
}

func monotonicUsec() (int64, error) { return 0, errNotLinux }
