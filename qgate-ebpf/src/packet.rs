//! Locating the TCP segment inside an skb at tc.
//!
//! Headers are read straight from the packet when they lie in the skb's
//! linear data (nearly always: the stack pulls them there), with one bounds
//! check each, and otherwise through `bpf_skb_load_bytes`, which also works
//! on non-linear (GSO) skbs. The helper costs a call per field: thirteen of
//! them made up most of a tc program's 550–600 ns per packet
//! (`BPF_ENABLE_STATS`), on a port the server hook reads, where the program
//! only finds the connection is not its own.

use aya_ebpf::programs::TcContext;
use qgate_common::FlowKey;

/// Ethertypes (IEEE 802) as they sit in `__sk_buff.protocol` (network order).
const ETH_P_IP: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86DD;
/// Ethernet header length: tc on Ethernet and loopback devices starts at the MAC header.
const ETH_HLEN: usize = 14;
/// IANA protocol number of TCP (RFC 790).
const IPPROTO_TCP: u8 = 6;
const IPPROTO_FRAGMENT: u8 = 44;
/// Fixed IPv6 header length (RFC 8200 §3).
const IPV6_HLEN: usize = 40;

/// A TCP segment's place in the skb and its addressing.
pub struct Segment {
    pub src_addr: [u8; 16],
    pub dst_addr: [u8; 16],
    pub src_port: u16,
    pub dst_port: u16,
    pub seq: u32,
    pub ack: u32,
    pub tcp_flags: u8,
    /// Offset of the TCP header from the start of the skb data.
    pub tcp_offset: u32,
    /// TCP header length in bytes (data offset × 4).
    pub tcp_header_len: u32,
    /// Offset of the first payload byte from the start of the skb data.
    pub payload_offset: u32,
    pub payload_len: u32,
    /// The first fragment of a fragmented IP packet (see [`Ports::fragment`]).
    pub fragment: bool,
}

/// Only the ports, for the early return on non-database traffic.
pub struct Ports {
    pub l3_offset: usize,
    pub l4_offset: usize,
    pub ip_len: usize,
    pub is_v6: bool,
    pub src_port: u16,
    pub dst_port: u16,
    /// The first fragment of a fragmented IP packet.
    pub fragment: bool,
}

/// The `T` at `offset` from the start of the packet.
#[inline(always)]
fn read<T: Copy>(ctx: &TcContext, offset: usize) -> Option<T> {
    let at = ctx.data() + offset;
    // At least two bytes: LLVM turns `at + 1 <= end` into `end > at`, which
    // the verifier does not take as a bound (every byte read here has a
    // next one in its header).
    let size = if core::mem::size_of::<T>() < 2 {
        2
    } else {
        core::mem::size_of::<T>()
    };
    if at + size <= ctx.data_end() {
        // SAFETY: inside the linear data, checked just above (the verifier
        // checks it again).
        Some(unsafe { core::ptr::read_unaligned(at as *const T) })
    } else {
        ctx.load::<T>(offset).ok()
    }
}

/// Where the IP header starts: after an Ethernet header when one is there
/// (its ethertype matches the skb's protocol), else at 0 (L3 devices).
fn l3_offset(ctx: &TcContext, ethertype: u16) -> usize {
    match read::<u16>(ctx, 12) {
        Some(t) if u16::from_be(t) == ethertype => ETH_HLEN,
        _ => 0,
    }
}

/// Reads just enough to know the TCP ports; `None` for anything that is not
/// unfragmented TCP over IPv4 or IPv6 without extension headers.
#[inline(always)]
pub fn ports(ctx: &TcContext) -> Option<Ports> {
    let proto = u16::from_be(ctx.skb.protocol() as u16);
    let mut fragment = false;
    let (l3_offset, l4_offset, ip_len, is_v6) = if proto == ETH_P_IP {
        let l3 = l3_offset(ctx, ETH_P_IP);
        let ver_ihl: u8 = read(ctx, l3)?;
        if ver_ihl >> 4 != 4 {
            return None;
        }
        if read::<u8>(ctx, l3 + 9)? != IPPROTO_TCP {
            return None;
        }
        // RFC 791: flags + fragment offset; a non-first fragment has no TCP header.
        let frag = u16::from_be(read::<u16>(ctx, l3 + 6)?);
        if frag & 0x1FFF != 0 {
            return None;
        }
        fragment = frag & 0x2000 != 0;
        let tot_len = u16::from_be(read::<u16>(ctx, l3 + 2)?) as usize;
        let ihl = ((ver_ihl & 0x0F) as usize) * 4;
        // GSO super-packets may carry tot_len 0 (BIG TCP): fall back to the skb length.
        let ip_len = if tot_len == 0 {
            (ctx.len() as usize).saturating_sub(l3)
        } else {
            tot_len
        };
        (l3, l3 + ihl, ip_len.saturating_sub(ihl), false)
    } else if proto == ETH_P_IPV6 {
        let l3 = l3_offset(ctx, ETH_P_IPV6);
        let mut l4 = l3 + IPV6_HLEN;
        let mut next = read::<u8>(ctx, l3 + 6)?;
        if next == IPPROTO_FRAGMENT {
            // RFC 8200 §4.5: next header, reserved, offset (13 bits) + M.
            let offset = u16::from_be(read::<u16>(ctx, l4 + 2)?);
            if offset & 0xFFF8 != 0 {
                return None;
            }
            next = read::<u8>(ctx, l4)?;
            l4 += 8;
            fragment = true;
        }
        if next != IPPROTO_TCP {
            return None;
        }
        let payload_len = u16::from_be(read::<u16>(ctx, l3 + 4)?) as usize;
        let ip_len = if payload_len == 0 {
            (ctx.len() as usize).saturating_sub(l3 + IPV6_HLEN)
        } else {
            payload_len
        }
        .saturating_sub(l4 - l3 - IPV6_HLEN);
        (l3, l4, ip_len, true)
    } else {
        return None;
    };
    let src_port = u16::from_be(read::<u16>(ctx, l4_offset)?);
    let dst_port = u16::from_be(read::<u16>(ctx, l4_offset + 2)?);
    Some(Ports {
        l3_offset,
        l4_offset,
        ip_len,
        is_v6,
        src_port,
        dst_port,
        fragment,
    })
}

/// Completes `ports` into the full segment description.
#[inline(always)]
pub fn segment(ctx: &TcContext, p: &Ports) -> Option<Segment> {
    let l4 = p.l4_offset;
    let mut src_addr = [0u8; 16];
    let mut dst_addr = [0u8; 16];
    let l3 = p.l3_offset;
    if p.is_v6 {
        src_addr = read(ctx, l3 + 8)?;
        dst_addr = read(ctx, l3 + 24)?;
    } else {
        let s: [u8; 4] = read(ctx, l3 + 12)?;
        let d: [u8; 4] = read(ctx, l3 + 16)?;
        // IPv4-mapped IPv6 (RFC 4291 §2.5.5.2).
        src_addr[10] = 0xFF;
        src_addr[11] = 0xFF;
        dst_addr[10] = 0xFF;
        dst_addr[11] = 0xFF;
        src_addr[12..16].copy_from_slice(&s);
        dst_addr[12..16].copy_from_slice(&d);
    }
    let seq = u32::from_be(read::<u32>(ctx, l4 + 4)?);
    let ack = u32::from_be(read::<u32>(ctx, l4 + 8)?);
    // RFC 9293 §3.1: data offset in 32-bit words, then the flag byte.
    let doff = ((read::<u8>(ctx, l4 + 12)? >> 4) as usize) * 4;
    let tcp_flags: u8 = read(ctx, l4 + 13)?;
    Some(Segment {
        src_addr,
        dst_addr,
        src_port: p.src_port,
        dst_port: p.dst_port,
        seq,
        ack,
        tcp_flags,
        tcp_offset: l4 as u32,
        tcp_header_len: doff as u32,
        payload_offset: (l4 + doff) as u32,
        payload_len: p.ip_len.saturating_sub(doff) as u32,
        fragment: p.fragment,
    })
}

impl Segment {
    /// The flow as the server sees it, whichever way this segment travels.
    pub fn flow(&self, to_server: bool) -> FlowKey {
        if to_server {
            FlowKey {
                client_addr: self.src_addr,
                server_addr: self.dst_addr,
                client_port: self.src_port,
                server_port: self.dst_port,
            }
        } else {
            FlowKey {
                client_addr: self.dst_addr,
                server_addr: self.src_addr,
                client_port: self.dst_port,
                server_port: self.src_port,
            }
        }
    }
}

/// A `bpf_loop` callback's context: the skb, which cannot be kept in a map.
#[repr(C)]
pub struct SkbRef {
    pub skb: *mut aya_ebpf::bindings::__sk_buff,
}
