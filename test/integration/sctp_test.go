package integration

import (
	"encoding/binary"
	"hash/crc32"
	"math/rand/v2"
	"net/netip"
	"syscall"
	"testing"
	"time"

	"github.com/miniproxy/miniproxy/test/netns"
)

// This kernel has no SCTP sockets (socket(..., IPPROTO_SCTP) fails with
// EPROTONOSUPPORT), but it forwards, tracks and NATs SCTP packets. So SCTP
// Services are exercised with raw sockets: the client sends the first
// packet of an association (an INIT chunk), and each pod listens for SCTP
// packets on a raw socket. What a pod receives says where the Service sent
// the INIT and which source address it saw, as for TCP and UDP; there is
// no answer, since no SCTP stack would give one.

const ipprotoSCTP = 132

var castagnoli = crc32.MakeTable(crc32.Castagnoli)

// sctpInit is an SCTP packet holding one INIT chunk, with its CRC32c.
func sctpInit(srcPort, dstPort uint16) []byte {
	p := make([]byte, 12+20)
	binary.BigEndian.PutUint16(p[0:], srcPort)
	binary.BigEndian.PutUint16(p[2:], dstPort)
	// Verification tag 0 (required for INIT), checksum filled in below.
	p[12] = 1                                      // chunk type INIT
	binary.BigEndian.PutUint16(p[14:], 20)         // chunk length
	binary.BigEndian.PutUint32(p[16:], 0x6d707831) // initiate tag
	binary.BigEndian.PutUint32(p[20:], 65536)      // a_rwnd
	binary.BigEndian.PutUint16(p[24:], 1)          // outbound streams
	binary.BigEndian.PutUint16(p[26:], 1)          // inbound streams
	binary.BigEndian.PutUint32(p[28:], 1)          // initial TSN
	binary.LittleEndian.PutUint32(p[8:], crc32.Checksum(p, castagnoli))
	return p
}

// rawSCTP opens a raw SCTP socket inside ns.
func rawSCTP(t *testing.T, ns *netns.Namespace) int {
	t.Helper()
	fd := -1
	if err := ns.Do(func() error {
		var err error
		fd, err = syscall.Socket(syscall.AF_INET, syscall.SOCK_RAW, ipprotoSCTP)
		return err
	}); err != nil {
		t.Fatalf("raw SCTP socket in %s: %v", ns.Short(), err)
	}
	return fd
}

// sctpOutcome sends an INIT from ns to dst and says which of pods got it,
// and from which source ("pod1<-10.244.1.1"), or "dropped" when none did
// within 1.5 s.
func sctpOutcome(t *testing.T, from *netns.Namespace, dst netip.AddrPort, pods map[string]*netns.Namespace, podPort uint16) string {
	t.Helper()
	srcPort := uint16(40000 + rand.IntN(20000))
	got := make(chan string, len(pods))
	for name, ns := range pods {
		fd := rawSCTP(t, ns)
		tv := syscall.Timeval{Sec: 1, Usec: 500000}
		if err := syscall.SetsockoptTimeval(fd, syscall.SOL_SOCKET, syscall.SO_RCVTIMEO, &tv); err != nil {
			syscall.Close(fd)
			t.Fatal(err)
		}
		// The reader closes its socket itself, when it is done or its
		// receive times out: closed under a blocked reader, the number
		// could be reused by the next probe's socket, whose packets the old
		// reader would then swallow.
		go func() {
			defer syscall.Close(fd)
			buf := make([]byte, 2048)
			for {
				n, _, err := syscall.Recvfrom(fd, buf, 0)
				if err != nil {
					return
				}
				ihl := int(buf[0]&0x0f) * 4
				if n < ihl+12 {
					continue
				}
				sctp := buf[ihl:n]
				if binary.BigEndian.Uint16(sctp[0:]) == srcPort && binary.BigEndian.Uint16(sctp[2:]) == podPort {
					src := netip.AddrFrom4([4]byte(buf[12:16]))
					got <- answer(name, src)
					return
				}
			}
		}()
	}
	fd := rawSCTP(t, from)
	defer syscall.Close(fd)
	to := &syscall.SockaddrInet4{Addr: dst.Addr().As4()}
	if err := syscall.Sendto(fd, sctpInit(srcPort, dst.Port()), 0, to); err != nil {
		t.Fatalf("send SCTP INIT to %s from %s: %v", dst, from.Short(), err)
	}
	select {
	case a := <-got:
		return a
	case <-time.After(1500 * time.Millisecond):
		return dropped
	}
}
