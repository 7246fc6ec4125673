package conntrack

import (
	"encoding/binary"
	"errors"
	"fmt"
	"net/netip"
	"runtime"
	"slices"
	"sync/atomic"
	"syscall"

	"github.com/vishvananda/netlink/nl"
	"github.com/vishvananda/netns"
	"golang.org/x/sys/unix"

	"github.com/miniproxy/miniproxy/pkg/iptables"
)

// Kernel is the conntrack table of one network namespace, read and changed
// through ctnetlink. It talks to the socket itself rather than through
// vishvananda/netlink's ConntrackTableList or ConntrackDeleteFilters, which
// read the whole dump into memory before looking at it: here each batch the
// kernel sends (up to 64 KiB) is judged and its stale entries deleted before
// the next batch is read, so a sweep holds one batch whatever the table's
// size. The kernel is asked to send only the protocol being swept (a dump
// filter, Linux 5.9+); an older kernel sends everything and the other
// protocols are skipped here.
type Kernel struct {
	ns netns.NsHandle
	// noFilter is set once the kernel refused a filtered dump.
	noFilter atomic.Bool
}

// OpenKernel returns the conntrack table of the calling thread's network
// namespace; every later Sweep works on that namespace, whatever thread
// runs it.
func OpenKernel() (*Kernel, error) {
	ns, err := netns.Get()
	if err != nil {
		return nil, fmt.Errorf("conntrack: find this thread's network namespace: %w", err)
	}
	return &Kernel{ns: ns}, nil
}

// KernelFilters says whether the kernel sends only the protocol asked for
// (true until a Sweep finds otherwise).
func (k *Kernel) KernelFilters() bool { return !k.noFilter.Load() }

// Close releases the namespace.
func (k *Kernel) Close() error { return k.ns.Close() }

const (
	ctaStatus           = 3      // CTA_STATUS
	ctaStatusMask       = 26     // CTA_STATUS_MASK (Linux 5.19+; older kernels ignore it)
	ipsSeenReply        = 1 << 1 // IPS_SEEN_REPLY
	ctaFilter           = 25     // CTA_FILTER
	ctaFilterOrigFlags  = 1      // CTA_FILTER_ORIG_FLAGS
	ctaFilterReplyFlags = 2      // CTA_FILTER_REPLY_FLAGS
	filterProtoNum      = 1 << 3 // CTA_FILTER_F_CTA_PROTO_NUM
	recvBuffer          = 64 << 10
	// socketTimeout bounds every wait for the kernel.
	socketTimeout = 10
)

var native = binary.NativeEndian

// Sweep implements Table. Asking the kernel for one protocol at a time
// costs a walk of its hash table per protocol; it saves reading every TCP
// entry, which on most nodes are nearly all of them.
func (k *Kernel) Sweep(fam iptables.Family, protos []uint8, stale func(*Entry) bool) (seen, deleted int, err error) {
	family := uint8(unix.AF_INET)
	if fam == iptables.IPv6 {
		family = unix.AF_INET6
	}
	dump, err := k.socket()
	if err != nil {
		return 0, 0, err
	}
	defer unix.Close(dump)
	del, err := k.socket()
	if err != nil {
		return 0, 0, err
	}
	defer unix.Close(del)
	s := sweep{dump: dump, del: del, family: family, protos: protos, stale: stale, buf: make([]byte, recvBuffer), ack: make([]byte, 8<<10)}
	if !k.noFilter.Load() {
		for _, proto := range protos {
			err = s.run(proto)
			if errors.Is(err, unix.EINVAL) || errors.Is(err, unix.EOPNOTSUPP) {
				if s.seen == 0 {
					k.noFilter.Store(true) // a kernel without dump filters
					break
				}
			}
			if err != nil {
				return s.seen, s.deleted, s.result(err)
			}
		}
		if !k.noFilter.Load() {
			return s.seen, s.deleted, s.result(nil)
		}
	}
	err = s.run(0)
	return s.seen, s.deleted, s.result(err)
}

// socket opens a netfilter netlink socket in the table's namespace, from a
// thread that is discarded afterwards (a thread moved into a namespace never
// runs other goroutines).
func (k *Kernel) socket() (int, error) {
	type result struct {
		fd  int
		err error
	}
	ch := make(chan result, 1)
	go func() {
		runtime.LockOSThread() // never unlocked: the thread ends with the goroutine
		if err := netns.Set(k.ns); err != nil {
			ch <- result{-1, fmt.Errorf("conntrack: enter the network namespace: %w", err)}
			return
		}
		fd, err := unix.Socket(unix.AF_NETLINK, unix.SOCK_RAW|unix.SOCK_CLOEXEC, unix.NETLINK_NETFILTER)
		if err == nil {
			err = unix.Bind(fd, &unix.SockaddrNetlink{Family: unix.AF_NETLINK})
		}
		tv := unix.Timeval{Sec: socketTimeout}
		if err == nil {
			err = unix.SetsockoptTimeval(fd, unix.SOL_SOCKET, unix.SO_RCVTIMEO, &tv)
		}
		if err == nil {
			err = unix.SetsockoptTimeval(fd, unix.SOL_SOCKET, unix.SO_SNDTIMEO, &tv)
		}
		if err != nil {
			if fd >= 0 {
				unix.Close(fd)
			}
			ch <- result{-1, fmt.Errorf("conntrack: open a netlink socket: %w", err)}
			return
		}
		ch <- result{fd, nil}
	}()
	r := <-ch
	return r.fd, r.err
}

var seq atomic.Uint32

// sweep is one Sweep's state; its buffers are reused for every batch and
// every deletion.
type sweep struct {
	dump, del int
	family    uint8
	protos    []uint8
	stale     func(*Entry) bool
	buf, ack  []byte
	req       []byte
	entry     Entry

	seen, deleted, failed int
	firstFailure          error
}

func (s *sweep) result(err error) error {
	if s.failed > 0 {
		err = errors.Join(err, fmt.Errorf("conntrack: %d stale entries could not be deleted: %w", s.failed, s.firstFailure))
	}
	return err
}

// header starts a request of type msg in s.req.
func (s *sweep) header(msg uint16, flags uint16) uint32 {
	n := seq.Add(1)
	s.req = s.req[:0]
	s.req = native.AppendUint32(s.req, 0) // length, set by finish
	s.req = native.AppendUint16(s.req, unix.NFNL_SUBSYS_CTNETLINK<<8|msg)
	s.req = native.AppendUint16(s.req, unix.NLM_F_REQUEST|flags)
	s.req = native.AppendUint32(s.req, n)
	s.req = native.AppendUint32(s.req, 0)
	s.req = append(s.req, s.family, unix.NFNETLINK_V0, 0, 0) // nfgenmsg
	return n
}

func (s *sweep) attr(typ uint16, val []byte) {
	s.req = native.AppendUint16(s.req, uint16(4+len(val)))
	s.req = native.AppendUint16(s.req, typ)
	s.req = append(s.req, val...)
	s.pad()
}

// nest appends a nested attribute whose content fill appends.
func (s *sweep) nest(typ uint16, fill func()) {
	at := len(s.req)
	s.req = native.AppendUint32(s.req, 0)
	fill()
	native.PutUint16(s.req[at:], uint16(len(s.req)-at))
	native.PutUint16(s.req[at+2:], typ|nl.NLA_F_NESTED)
}

// raw appends an attribute copied from a dump, header included.
func (s *sweep) raw(a []byte) {
	s.req = append(s.req, a...)
	s.pad()
}

func (s *sweep) pad() {
	for len(s.req)%4 != 0 {
		s.req = append(s.req, 0)
	}
}

func (s *sweep) send(fd int) error {
	native.PutUint32(s.req, uint32(len(s.req)))
	_, err := unix.Write(fd, s.req)
	return err
}

// run dumps the family's entries (of proto only, when proto is not 0) and
// judges each, deleting the stale ones as it goes.
func (s *sweep) run(proto uint8) error {
	want := s.header(nl.IPCTNL_MSG_CT_GET, unix.NLM_F_DUMP)
	if proto != 0 {
		s.nest(nl.CTA_TUPLE_ORIG, func() {
			s.nest(nl.CTA_TUPLE_PROTO, func() { s.attr(nl.CTA_PROTO_NUM, []byte{proto}) })
		})
		s.nest(ctaFilter, func() {
			s.attr(ctaFilterOrigFlags, native.AppendUint32(nil, filterProtoNum))
			s.attr(ctaFilterReplyFlags, native.AppendUint32(nil, 0))
		})
	}
	if proto == ProtoTCP {
		// Only the entries that never saw a reply: on a busy node nearly
		// every TCP entry did, and none of those is judged stale.
		s.attr(ctaStatus, binary.BigEndian.AppendUint32(nil, 0))
		s.attr(ctaStatusMask, binary.BigEndian.AppendUint32(nil, ipsSeenReply))
	}
	if err := s.send(s.dump); err != nil {
		return fmt.Errorf("conntrack: ask for the table: %w", err)
	}
	for {
		n, err := read(s.dump, s.buf)
		if err != nil {
			return fmt.Errorf("conntrack: read the table: %w", err)
		}
		for b := s.buf[:n]; len(b) >= unix.NLMSG_HDRLEN; {
			l := int(native.Uint32(b[0:4]))
			if l < unix.NLMSG_HDRLEN || l > len(b) {
				return errors.New("conntrack: malformed netlink message")
			}
			typ, seqNo, body := native.Uint16(b[4:6]), native.Uint32(b[8:12]), b[unix.NLMSG_HDRLEN:l]
			b = b[min(align(l), len(b)):]
			if seqNo != want {
				continue
			}
			switch typ {
			case unix.NLMSG_DONE:
				if len(body) >= 4 {
					if errno := int32(native.Uint32(body)); errno != 0 {
						return fmt.Errorf("conntrack: dump ended with %w", syscall.Errno(-errno))
					}
				}
				return nil
			case unix.NLMSG_ERROR:
				if len(body) >= 4 {
					if errno := int32(native.Uint32(body)); errno != 0 {
						return fmt.Errorf("conntrack: dump refused: %w", syscall.Errno(-errno))
					}
				}
				return nil
			}
			if typ&0xff != nl.IPCTNL_MSG_CT_NEW || len(body) < 4 {
				continue
			}
			orig, zone, id, ok := s.parse(body[4:])
			if !ok || !slices.Contains(s.protos, s.entry.Proto) || (s.entry.Proto == ProtoTCP && s.entry.Replied) {
				continue // a kernel without the filters sends them all
			}
			s.seen++
			if s.stale(&s.entry) {
				s.delete(orig, zone, id)
			}
		}
	}
}

// delete removes one entry by its original tuple, zone and id (so that an
// entry created since with the same tuple is left alone), and waits for the
// kernel's answer.
func (s *sweep) delete(orig, zone, id []byte) {
	want := s.header(nl.IPCTNL_MSG_CT_DELETE, unix.NLM_F_ACK)
	s.raw(orig)
	if zone != nil {
		s.raw(zone)
	}
	if id != nil {
		s.raw(id)
	}
	err := s.send(s.del)
	for err == nil {
		var n int
		n, err = read(s.del, s.ack)
		if err != nil {
			break
		}
		b := s.ack[:n]
		if len(b) < unix.NLMSG_HDRLEN+4 || native.Uint32(b[8:12]) != want || native.Uint16(b[4:6]) != unix.NLMSG_ERROR {
			continue
		}
		switch errno := syscall.Errno(-int32(native.Uint32(b[unix.NLMSG_HDRLEN:]))); errno {
		case 0:
			s.deleted++
			return
		case unix.ENOENT: // gone already (timed out, or replaced)
			return
		default:
			err = errno
		}
	}
	s.failed++
	if s.firstFailure == nil {
		s.firstFailure = err
	}
}

// parse fills s.entry from a conntrack message's attributes and returns the
// raw original-tuple, zone and id attributes for a deletion.
func (s *sweep) parse(attrs []byte) (orig, zone, id []byte, ok bool) {
	s.entry = Entry{}
	var haveOrig, haveReply bool
	for it := (attrIter{b: attrs}); it.next(); {
		switch it.typ {
		case nl.CTA_TUPLE_ORIG:
			orig = it.raw
			haveOrig = parseTuple(it.val, &s.entry.Proto, &s.entry.OrigSrc, &s.entry.OrigDst)
		case nl.CTA_TUPLE_REPLY:
			var p uint8
			haveReply = parseTuple(it.val, &p, &s.entry.ReplySrc, &s.entry.ReplyDst)
		case ctaStatus:
			if len(it.val) == 4 {
				s.entry.Replied = binary.BigEndian.Uint32(it.val)&ipsSeenReply != 0
			}
		case nl.CTA_ZONE:
			zone = it.raw
		case nl.CTA_ID:
			id = it.raw
		}
	}
	return orig, zone, id, haveOrig && haveReply
}

func parseTuple(b []byte, proto *uint8, src, dst *netip.AddrPort) bool {
	var srcIP, dstIP netip.Addr
	var srcPort, dstPort uint16
	for it := (attrIter{b: b}); it.next(); {
		switch it.typ {
		case nl.CTA_TUPLE_IP:
			for ip := (attrIter{b: it.val}); ip.next(); {
				switch {
				case (ip.typ == nl.CTA_IP_V4_SRC || ip.typ == nl.CTA_IP_V4_DST) && len(ip.val) == 4:
					a := netip.AddrFrom4([4]byte(ip.val))
					if ip.typ == nl.CTA_IP_V4_SRC {
						srcIP = a
					} else {
						dstIP = a
					}
				case (ip.typ == nl.CTA_IP_V6_SRC || ip.typ == nl.CTA_IP_V6_DST) && len(ip.val) == 16:
					a := netip.AddrFrom16([16]byte(ip.val))
					if ip.typ == nl.CTA_IP_V6_SRC {
						srcIP = a
					} else {
						dstIP = a
					}
				}
			}
		case nl.CTA_TUPLE_PROTO:
			for p := (attrIter{b: it.val}); p.next(); {
				switch {
				case p.typ == nl.CTA_PROTO_NUM && len(p.val) == 1:
					*proto = p.val[0]
				case p.typ == nl.CTA_PROTO_SRC_PORT && len(p.val) == 2:
					srcPort = binary.BigEndian.Uint16(p.val)
				case p.typ == nl.CTA_PROTO_DST_PORT && len(p.val) == 2:
					dstPort = binary.BigEndian.Uint16(p.val)
				}
			}
		}
	}
	*src, *dst = netip.AddrPortFrom(srcIP, srcPort), netip.AddrPortFrom(dstIP, dstPort)
	return srcIP.IsValid() && dstIP.IsValid()
}

// attrIter walks netlink attributes without copying them.
type attrIter struct {
	b        []byte
	typ      uint16
	val, raw []byte
}

func (it *attrIter) next() bool {
	if len(it.b) < 4 {
		return false
	}
	l := int(native.Uint16(it.b[0:2]))
	if l < 4 || l > len(it.b) {
		it.b = nil
		return false
	}
	it.typ = native.Uint16(it.b[2:4]) & nl.NLA_TYPE_MASK
	it.raw, it.val = it.b[:l], it.b[4:l]
	it.b = it.b[min(align(l), len(it.b)):]
	return true
}

func align(n int) int { return (n + 3) &^ 3 }

// read reads one datagram, retrying when a signal interrupts the wait.
func read(fd int, buf []byte) (int, error) {
	for {
		n, err := unix.Read(fd, buf)
		switch {
		case errors.Is(err, unix.EINTR):
			continue
		case errors.Is(err, unix.EAGAIN):
			return 0, fmt.Errorf("no answer from the kernel in %d s", socketTimeout)
		case err != nil:
			return 0, err
		case n < unix.NLMSG_HDRLEN:
			return 0, errors.New("short netlink message")
		}
		return n, nil
	}
}
