// SPDX-License-Identifier: Apache-2.0
/*
 * kipfix flow metering program (tc clsact, direct action).
 *
 * Every IP packet is folded into a per-CPU flow table keyed by observation
 * point (netns id, ifindex, direction) and 5-tuple. The program never decides
 * a packet's fate: it always returns TC_ACT_UNSPEC so the next filter on the
 * hook (or the default action) runs as if kipfix were not there.
 *
 * Exact drains: the program reaches its table through a one-slot
 * array-of-maps. The agent points the slot at the spare table and the
 * update syscall returns only after an RCU grace period (the kernel waits
 * for running programs when a map-in-map slot changes), so nothing writes
 * the old table while it is read and cleared.
 *
 * Compile-time constants (BCC cflags): MAX_FLOWS, PIN_PATH.
 */
#include <uapi/linux/bpf.h>
#include <uapi/linux/pkt_cls.h>
#include <uapi/linux/if_ether.h>
#include <uapi/linux/ip.h>
#include <uapi/linux/ipv6.h>
#include <uapi/linux/in.h>
#include <uapi/linux/tcp.h>

#ifndef MAX_FLOWS
#define MAX_FLOWS 65536
#endif
#ifndef PIN_PATH
#define PIN_PATH "/sys/fs/bpf/kipfix"
#endif

#define DIR_INGRESS 0
#define DIR_EGRESS 1

#define ETH_P_8021Q_ 0x8100
#define ETH_P_8021AD_ 0x88A8
#define MAX_IPV6_EXT_HEADERS 6

/* 48 octets; mirrored by kipfix.agent.kernelflow.KEY. */
struct flow_key {
    __u32 ifindex;
    __u16 netns_id;     /* agent-assigned, carried in the tc filter's classid */
    __u8 direction;
    __u8 ip_version;
    __u8 src[16];       /* IPv4 in the first 4 octets, rest zero */
    __u8 dst[16];
    __u16 sport;        /* host order; 0 for protocols without ports */
    __u16 dport;        /* host order; ICMP: type << 8 | code */
    __u8 protocol;
    __u8 pad[3];
};

/* 48 octets; mirrored by kipfix.agent.kernelflow.VALUE. */
struct flow_value {
    __u64 packets;
    __u64 bytes;        /* IP octets (IP header + payload), per IPFIX octetDeltaCount */
    __u64 first_ns;     /* bpf_ktime_get_ns() */
    __u64 last_ns;
    __u32 fragment_id;  /* last IPv4 id / IPv6 fragment id of a fragmented packet */
    __u16 vlan_id;      /* outer 802.1Q/802.1ad tag */
    __u16 inner_vlan_id;
    __u8 tcp_flags;     /* OR of every packet's flags */
    __u8 min_ttl;
    __u8 max_ttl;
    __u8 tos;           /* last ToS / traffic class */
    __u8 pad[4];
};

struct unmetered {
    __u64 packets;
    __u64 bytes;
    __u64 first_ns;     /* the first and last packet not metered (RFC 7011 4.2) */
    __u64 last_ns;
};

BPF_TABLE_PINNED("percpu_hash", struct flow_key, struct flow_value, flows_a, MAX_FLOWS, PIN_PATH "/flows_a");
BPF_TABLE_PINNED("percpu_hash", struct flow_key, struct flow_value, flows_b, MAX_FLOWS, PIN_PATH "/flows_b");
BPF_TABLE_PINNED("array_of_maps$flows_a", int, int, active_table, 1, PIN_PATH "/active_table");
/* Packets the table had no room for: counted here, reported by the agent. */
BPF_TABLE_PINNED("percpu_array", int, struct unmetered, table_full, 1, PIN_PATH "/table_full");

struct packet_info {
    __u32 l3_off;
    __u32 ip_len;       /* from the IP header: the frame may carry link-layer padding after it */
    __u32 l4_hdr_end;   /* end of the transport header, for per-segment header bytes */
    __u16 vlan_id;
    __u16 inner_vlan_id;
    __u8 ttl;
    __u8 tos;
    __u8 tcp_flags;
    __u32 fragment_id;
};

static __always_inline int parse_l4(void *data, void *data_end, __u32 off, __u8 proto,
                                    struct flow_key *key, struct packet_info *info)
{
    void *l4 = data + off;
    if (proto == IPPROTO_TCP) {
        struct tcphdr *tcp = l4;
        if ((void *)(tcp + 1) > data_end)
            return 0;
        key->sport = bpf_ntohs(tcp->source);
        key->dport = bpf_ntohs(tcp->dest);
        info->tcp_flags = ((__u8 *)tcp)[13];
        info->l4_hdr_end = off + tcp->doff * 4;
    } else if (proto == IPPROTO_UDP || proto == IPPROTO_SCTP) {
        /* UDP and SCTP both open with source and destination port. */
        __be16 *ports = l4;
        if ((void *)(ports + 2) > data_end)
            return 0;
        key->sport = bpf_ntohs(ports[0]);
        key->dport = bpf_ntohs(ports[1]);
        info->l4_hdr_end = off + (proto == IPPROTO_UDP ? 8 : 12);
    } else if (proto == IPPROTO_ICMP || proto == IPPROTO_ICMPV6) {
        __u8 *icmp = l4;
        if ((void *)(icmp + 2) > data_end)
            return 0;
        key->dport = ((__u16)icmp[0] << 8) | icmp[1];
    }
    return 0;
}

static __always_inline int parse_ipv4(void *data, void *data_end, struct flow_key *key,
                                      struct packet_info *info)
{
    struct iphdr *ip = data + info->l3_off;
    if ((void *)(ip + 1) > data_end)
        return -1;
    __u32 ihl = ip->ihl * 4;
    if (ihl < sizeof(*ip))
        return -1;
    key->ip_version = 4;
    key->protocol = ip->protocol;
    __builtin_memcpy(key->src, &ip->saddr, 4);
    __builtin_memcpy(key->dst, &ip->daddr, 4);
    info->ttl = ip->ttl;
    info->tos = ip->tos;
    info->ip_len = bpf_ntohs(ip->tot_len);
    info->l4_hdr_end = info->l3_off + ihl;
    __u16 frag = bpf_ntohs(ip->frag_off);
    if (frag & 0x3fff) /* MF set or non-zero offset: a fragment */
        info->fragment_id = bpf_ntohs(ip->id);
    if (frag & 0x1fff) /* not the first fragment: no transport header */
        return 0;
    return parse_l4(data, data_end, info->l3_off + ihl, ip->protocol, key, info);
}

static __always_inline int parse_ipv6(void *data, void *data_end, struct flow_key *key,
                                      struct packet_info *info)
{
    struct ipv6hdr *ip6 = data + info->l3_off;
    if ((void *)(ip6 + 1) > data_end)
        return -1;
    key->ip_version = 6;
    __builtin_memcpy(key->src, &ip6->saddr, 16);
    __builtin_memcpy(key->dst, &ip6->daddr, 16);
    info->ttl = ip6->hop_limit;
    info->tos = (ip6->priority << 4) | (ip6->flow_lbl[0] >> 4);
    if (ip6->payload_len) /* 0: a jumbogram, whose length only the skb knows */
        info->ip_len = bpf_ntohs(ip6->payload_len) + sizeof(*ip6);

    __u8 next = ip6->nexthdr;
    __u32 off = info->l3_off + sizeof(*ip6);
#pragma unroll
    for (int i = 0; i < MAX_IPV6_EXT_HEADERS; i++) {
        if (next != IPPROTO_HOPOPTS && next != IPPROTO_ROUTING && next != IPPROTO_DSTOPTS &&
            next != IPPROTO_FRAGMENT)
            break;
        __u8 *ext = data + off;
        if ((void *)(ext + 8) > data_end)
            return -1;
        if (next == IPPROTO_FRAGMENT) {
            __u16 frag = ((__u16)ext[2] << 8) | ext[3];
            info->fragment_id = ((__u32)ext[4] << 24) | ((__u32)ext[5] << 16) | ((__u32)ext[6] << 8) | ext[7];
            next = ext[0];
            off += 8;
            if (frag & 0xfff8) { /* non-zero offset: no transport header here */
                key->protocol = next;
                info->l4_hdr_end = off;
                return 0;
            }
            continue;
        }
        next = ext[0];
        off += ((__u32)ext[1] + 1) * 8;
    }
    key->protocol = next;
    info->l4_hdr_end = off;
    return parse_l4(data, data_end, off, next, key, info);
}

static __always_inline void count(struct flow_value *v, struct packet_info *info, __u64 now,
                                  __u64 packets, __u64 bytes)
{
    if (v->packets == 0) {
        /* first packet on this CPU (the entry may have been made by another CPU) */
        v->first_ns = now;
        v->min_ttl = info->ttl;
        v->max_ttl = info->ttl;
    }
    v->packets += packets;
    v->bytes += bytes;
    v->last_ns = now;
    v->tcp_flags |= info->tcp_flags;
    if (info->ttl < v->min_ttl)
        v->min_ttl = info->ttl;
    if (info->ttl > v->max_ttl)
        v->max_ttl = info->ttl;
    v->tos = info->tos;
    v->vlan_id = info->vlan_id;
    v->inner_vlan_id = info->inner_vlan_id;
    if (info->fragment_id)
        v->fragment_id = info->fragment_id;
}

static __always_inline int meter(struct __sk_buff *skb, __u8 direction)
{
    void *data = (void *)(long)skb->data;
    void *data_end = (void *)(long)skb->data_end;
    struct ethhdr *eth = data;
    if ((void *)(eth + 1) > data_end)
        return TC_ACT_UNSPEC;

    struct packet_info info = {};
    struct flow_key key = {};
    __u16 proto = bpf_ntohs(eth->h_proto);
    __u32 off = sizeof(*eth);
    int tags = 0;

    /* An offloaded (or already stripped) outer tag lives in skb metadata. */
    if (skb->vlan_present) {
        info.vlan_id = skb->vlan_tci & 0x0fff;
        tags = 1;
    }
#pragma unroll
    for (int i = 0; i < 2; i++) {
        if (proto != ETH_P_8021Q_ && proto != ETH_P_8021AD_)
            break;
        __be16 *tag = data + off;
        if ((void *)(tag + 2) > data_end)
            return TC_ACT_UNSPEC;
        __u16 vid = bpf_ntohs(tag[0]) & 0x0fff;
        if (tags == 0)
            info.vlan_id = vid;
        else
            info.inner_vlan_id = vid;
        tags++;
        proto = bpf_ntohs(tag[1]);
        off += 4;
    }

    info.l3_off = off;
    int ret;
    if (proto == ETH_P_IP)
        ret = parse_ipv4(data, data_end, &key, &info);
    else if (proto == ETH_P_IPV6)
        ret = parse_ipv6(data, data_end, &key, &info);
    else
        return TC_ACT_UNSPEC; /* ARP, LLDP, ...: not a flow */
    if (ret < 0)
        return TC_ACT_UNSPEC;

    key.ifindex = skb->ifindex;
    key.netns_id = skb->tc_classid & 0xffff;
    key.direction = direction;

    /* Octets are IP octets: the IP header's length, not the frame's, which
     * a short packet pads to 60 octets on Ethernet (ingress on a real NIC).
     * A GSO/GRO packet stands for gso_segs packets on the wire, each with
     * its own copy of the headers up to the transport header; the stack
     * built it, so it has no padding (and its IP length may be 0 or stale). */
    __u64 segs = skb->gso_segs > 1 ? skb->gso_segs : 1;
    __u64 bytes = skb->len - info.l3_off;
    if (segs > 1) {
        if (info.l4_hdr_end > info.l3_off)
            bytes += (segs - 1) * (info.l4_hdr_end - info.l3_off);
    } else if (info.ip_len && info.ip_len < bytes) {
        bytes = info.ip_len;
    }
    __u64 now = bpf_ktime_get_ns();

    int zero = 0;
    void *table = active_table.lookup(&zero);
    if (!table)
        return TC_ACT_UNSPEC;
    struct flow_value *v = bpf_map_lookup_elem(table, &key);
    if (!v) {
        struct flow_value fresh = {};
        count(&fresh, &info, now, segs, bytes);
        if (bpf_map_update_elem(table, &key, &fresh, BPF_NOEXIST) == 0)
            return TC_ACT_UNSPEC;
        /* Another CPU made the entry meanwhile, or the table is full. */
        v = bpf_map_lookup_elem(table, &key);
        if (!v) {
            struct unmetered *lost = table_full.lookup(&zero);
            if (lost) {
                if (lost->packets == 0)
                    lost->first_ns = now;
                lost->packets += segs;
                lost->bytes += bytes;
                lost->last_ns = now;
            }
            return TC_ACT_UNSPEC;
        }
    }
    count(v, &info, now, segs, bytes);
    return TC_ACT_UNSPEC;
}

int kipfix_ingress(struct __sk_buff *skb)
{
    return meter(skb, DIR_INGRESS);
}

int kipfix_egress(struct __sk_buff *skb)
{
    return meter(skb, DIR_EGRESS);
}
