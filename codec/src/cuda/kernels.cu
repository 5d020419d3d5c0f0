// kvwire GPU codec kernels (native levels cg-high, cg-default, cg-low; fp16 input).
// Compiled at run time by NVRTC with --fmad=false, so every float expression below is
// rounded operation by operation, as the CPU code (Rust never contracts to FMA) does.
// The bitstream is codec/FORMAT.md (version 2): 32 rANS lanes per block sharing one
// interleaved u16 word sequence; a warp codes a block, lane j = rANS lane j.

typedef unsigned char u8;
typedef unsigned short u16;
typedef unsigned int u32;
typedef unsigned long long u64;

#define FULL 0xffffffffu
#define LANES 32
#define RANS_L (1u << 15)
#define NMEM 192   // members per model set: 2 shapes x 48 scales x 2 offsets
#define MAXR 128   // residual slots per member in the encoder and cost tables
#define NSCALES 48

__device__ __forceinline__ float h2f(u16 h) {
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h));
    return f;
}
__device__ __forceinline__ u16 f2h(float f) {
    u16 h;
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(f));
    return h;
}
__device__ __forceinline__ u32 lanemask_lt() {
    u32 m;
    asm("mov.u32 %0, %%lanemask_lt;" : "=r"(m));
    return m;
}
__device__ __forceinline__ u32 ld_u16(const u8* p) { return (u32)p[0] | ((u32)p[1] << 8); }
__device__ __forceinline__ u32 ld_u32(const u8* p) {
    return (u32)p[0] | ((u32)p[1] << 8) | ((u32)p[2] << 16) | ((u32)p[3] << 24);
}

// Element index of (layer li of this launch, part p, token t, channel c).
__device__ __forceinline__ u64 elem_index(u32 li, u32 p, u32 t, u32 c, u32 H, u32 T, u32 D,
                                          u32 vllm) {
    u32 C = H * D;
    if (vllm) return (((u64)li * 2 + p) * T + t) * C + c;
    u32 h = c / D, d = c - h * D;
    return ((((u64)li * 2 + p) * H + h) * T + t) * D + d;
}

// ---------------------------------------------------------------------------------------------
// CRC32C (Castagnoli, reflected 0x82F63B78): byte table in shared memory, lanes combined with
// zlib's multmodp / x2nmodp (x2n[k] = x^(2^k) mod P; both tables come from the host).
#define CRC_POLY 0x82F63B78u

__device__ u32 multmodp(u32 a, u32 b) {
    u32 m = 1u << 31, p = 0;
    while (m) {
        if (a & m) {
            p ^= b;
            if ((a & (m - 1)) == 0) break;
        }
        m >>= 1;
        b = (b & 1) ? (b >> 1) ^ CRC_POLY : b >> 1;
    }
    return p;
}
// x^(8 n) mod P.
__device__ u32 x8nmodp(u64 n, const u32* __restrict__ x2n) {
    u32 p = 1u << 31;
    u32 k = 3;
    while (n) {
        if (n & 1) p = multmodp(x2n[k & 31], p);
        n >>= 1;
        k++;
    }
    return p;
}

// CRC32C of (hdr[4..20] ++ hdr[24..24+payload_len]) by the whole CTA (blockDim.x threads,
// a multiple of 32, at most 1024). Every thread gets the result.
__device__ u32 block_crc(const u8* blk, u32 payload_len, u32* red /* smem, 32 words */,
                         const u32* tab /* smem 256 */, const u32* __restrict__ x2n) {
    u64 R = 16 + (u64)payload_len;
    u32 nt = blockDim.x, tid = threadIdx.x;
    u64 seg = (R + nt - 1) / nt;
    u64 b0 = seg * tid;
    if (b0 > R) b0 = R;
    u64 b1 = b0 + seg;
    if (b1 > R) b1 = R;
    u32 c = 0;
    for (u64 v = b0; v < b1; v++) {
        u8 byte = v < 16 ? blk[4 + v] : blk[24 + (v - 16)];
        c = tab[(c ^ byte) & 0xff] ^ (c >> 8);
    }
    u32 term = (b1 > b0) ? multmodp(x8nmodp(R - b1, x2n), c) : 0;
    if (tid == 0) term ^= multmodp(x8nmodp(R, x2n), 0xffffffffu);
    for (int o = 16; o > 0; o >>= 1) term ^= __shfl_xor_sync(FULL, term, o);
    if ((tid & 31) == 0) red[tid >> 5] = term;
    __syncthreads();
    u32 all = 0;
    for (u32 i = 0; i < nt / 32; i++) all ^= red[i];
    __syncthreads();
    return all ^ 0xffffffffu;
}

// ---------------------------------------------------------------------------------------------
// Encoder 1: per-token absmax and quantization. One warp per (layer, part, token) row.
// syms: per block (li, chunk) a region of 2*chunk*C bytes, token-major per part:
// (p*n + i)*C + c. scales: [(li*2 + p)*T + t] = f16 bits of the row's absmax.
extern "C" __global__ void kv_quantize(const u16* __restrict__ x, u32 nl, u32 H, u32 T, u32 D,
                                       u32 vllm, u32 chunk, u32 nb, const u8* __restrict__ bins,
                                       u32 layer0, u32 vec, u8* __restrict__ syms,
                                       u16* __restrict__ scales, u32* __restrict__ err) {
    u32 lane = threadIdx.x & 31;
    u64 row = ((u64)blockIdx.x * blockDim.x + threadIdx.x) >> 5;
    if (row >= (u64)nl * 2 * T) return;
    u32 t = (u32)(row % T);
    u32 p = (u32)((row / T) & 1);
    u32 li = (u32)(row / (2 * (u64)T));
    u32 C = H * D;
    u32 b = bins[(layer0 + li) * 2 + p];
    u32 MAX = b / 2 - 1, top = 2 * MAX;
    u32 amax = 0;
    if (vec) {
        for (u32 c = lane * 8; c < C; c += 256) {
            uint4 v = *(const uint4*)(x + elem_index(li, p, t, c, H, T, D, vllm));
            u32 w[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
            for (int i = 0; i < 4; i++) {
                amax = max(amax, w[i] & 0x7fffu);
                amax = max(amax, (w[i] >> 16) & 0x7fffu);
            }
        }
    } else {
        for (u32 c = lane; c < C; c += 32) amax = max(amax, (u32)x[elem_index(li, p, t, c, H, T, D, vllm)] & 0x7fffu);
    }
    amax = __reduce_max_sync(FULL, amax);
    if (amax >= 0x7c00u) {
        if (lane == 0) atomicMin(err, (u32)row);  // the first non-finite row
        amax = 0;
    }
    u32 chunk_i = t / chunk, i = t - chunk_i * chunk;
    u32 n = min(chunk, T - chunk_i * chunk);
    u8* out = syms + ((u64)li * nb + chunk_i) * 2 * (u64)chunk * C + ((u64)p * n + i) * C;
    if (lane == 0) scales[((u64)li * 2 + p) * T + t] = (u16)amax;
    float m = h2f((u16)amax);
    float maxf = (float)MAX;
    float factor = __fdiv_rn(maxf, m);
    bool zero = (m == 0.0f) || isinf(factor) || isnan(factor);
    if (vec) {
        for (u32 c = lane * 8; c < C; c += 256) {
            uint4 v = *(const uint4*)(x + elem_index(li, p, t, c, H, T, D, vllm));
            u32 w[4] = {v.x, v.y, v.z, v.w};
            u64 packed = 0;
#pragma unroll
            for (int k = 0; k < 8; k++) {
                u32 hb = (w[k >> 1] >> (16 * (k & 1))) & 0xffffu;
                u32 q = MAX;
                if (!zero) {
                    float y = __fadd_rn(__fmul_rn(h2f((u16)hb), factor), maxf);
                    q = min(__float2uint_rn(fmaxf(y, 0.0f)), top);
                }
                packed |= (u64)q << (8 * k);
            }
            *(u64*)(out + c) = packed;
        }
    } else {
        for (u32 c = lane; c < C; c += 32) {
            u32 q = MAX;
            if (!zero) {
                float y = __fadd_rn(__fmul_rn(h2f(x[elem_index(li, p, t, c, H, T, D, vllm)]), factor), maxf);
                q = min(__float2uint_rn(fmaxf(y, 0.0f)), top);
            }
            out[c] = (u8)q;
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Encoder 2: model choice, one warp per (block, part, group of 32 streams); the symbols are
// replaced in place by their residual indices. Mirrors codec/src/native/choose.rs.
// models[bi*2C + stream] = rho | mu2 << 3 | shape << 10 | scale << 11 (the 17-bit field).
extern "C" __global__ void kv_models(u8* __restrict__ syms, u32 nl, u32 C, u32 T, u32 chunk,
                                     u32 nb, const u8* __restrict__ bins, u32 layer0,
                                     const u8* __restrict__ set_of /* [L*2] */,
                                     const u32* __restrict__ cost /* [set][NMEM][MAXR] */,
                                     double ln_step, u32* __restrict__ models, u32 hist_bins) {
    extern __shared__ u32 smem[];
    u32 lane = threadIdx.x & 31, wib = threadIdx.x >> 5;
    u32* hist = smem + wib * hist_bins * 32;
    u32 G = (C + 31) / 32;
    u64 wi = ((u64)blockIdx.x * blockDim.x + threadIdx.x) >> 5;
    if (wi >= (u64)nl * nb * 2 * G) return;
    u32 bi = (u32)(wi / (2 * G)), gi = (u32)(wi % (2 * G));
    u32 p = gi / G, g0 = (gi % G) * 32, k = min(32u, C - g0);
    u32 li = bi / nb, ch = bi % nb;
    u32 n = min(chunk, T - ch * chunk);
    u32 l = layer0 + li;
    u32 w = bins[l * 2 + p] - 2;
    bool active = lane < k;
    u8* col = syms + (u64)bi * 2 * chunk * C + (u64)p * n * C + g0 + lane;
    u32 s1 = 0, s2 = 0, lag = 0;
    if (active) {
        u32 prev = col[0];
        for (u32 t = 0; t < n; t++) {
            u32 s = col[(u64)t * C];
            s1 += s;
            s2 += s * s;
            lag += s * prev;
            prev = s;
        }
    }
    // prediction_model
    double nf = (double)n;
    double mean = (double)s1 / nf;
    double var = (double)s2 / nf - mean * mean;
    double cov = (double)lag / nf - mean * mean;
    u32 mu2 = (u32)min((2ull * s1 + n / 2) / n, 2ull * w);
    u32 rho = 0;
    double best_f = 0;
    for (u32 i = 0; i < 5; i++) {
        double r = (double)(2 * i) / 8.0;
        double f = var * (1.0 + r * r) - 2.0 * r * cov;
        if (i == 0 || f < best_f) {
            best_f = f;
            rho = i;
        }
    }
    u32 rv = 2 * rho;
    u32 first = rv == 0 ? mu2 >> 1 : (mu2 + 1) >> 1;
    u32 rho2 = 2 * rv;
    u32 bias = rv == 0 ? 16 * first : (8 - rv) * mu2 + 8;
    u32 offset = rv == 0 ? (mu2 & 1) : 0;
    u32 nbins = 2 * w + 1;
    for (u32 i = 0; i < nbins; i++) hist[i * 32 + lane] = 0;
    if (active) {
        u32 base = first;
        for (u32 t = 0; t < n; t++) {
            u32 s = col[(u64)t * C];
            u32 ri = (s + w - base) & (MAXR - 1);
            hist[ri * 32 + lane] += 1;
            col[(u64)t * C] = (u8)ri;
            base = (rho2 * s + bias) >> 4;
        }
    }
    if (!active) return;
    // choose_shape_scale
    double centre = (double)offset * 0.5;
    double sq = 0.0;
    u32 lo = nbins, hi = 0;
    for (u32 i = 0; i < nbins; i++) {
        u32 c = hist[i * 32 + lane];
        double d = (double)i - (double)w - centre;
        sq = sq + ((double)c * d) * d;
        if (c) {
            if (lo == nbins) lo = i;
            hi = i + 1;
        }
    }
    if (lo == nbins) lo = 0;
    double sd = sqrt(sq / nf);
    if (!(sd >= 1e-3)) sd = 1e-3;
    // Exact integer code lengths (1/4096 bit; n * 12 * 4096 < 2^32), as the CPU prices them.
    const u32* cs = cost + (u64)set_of[l * 2 + p] * NMEM * MAXR;
    u32 best_c = 0xffffffffu;
    u32 best_shape = 0, best_scale = 0;
    for (u32 shape = 0; shape < 2; shape++) {
        double b = shape == 0 ? sd / 1.4142135623730951 : sd;
        double kf = round(log(b / 0.08) / ln_step);
        u32 k0 = (isnan(kf) || kf < 0.0) ? 0 : (u32)min(kf, 47.0);
        u32 kk = k0;
        u32 ck = 0;
        {
            const u32* tb = cs + ((u64)((shape * NSCALES + kk) * 2 + offset)) * MAXR;
            for (u32 i = lo; i < hi; i++) ck += hist[i * 32 + lane] * tb[i];
        }
        for (int dir = 1; dir >= -1; dir -= 2) {
            for (;;) {
                int nk = (int)kk + dir;
                if (nk < 0 || nk >= NSCALES) break;
                const u32* tb = cs + ((u64)((shape * NSCALES + nk) * 2 + offset)) * MAXR;
                u32 acc = 0;
                for (u32 i = lo; i < hi; i++) acc += hist[i * 32 + lane] * tb[i];
                if (acc >= ck) break;
                kk = (u32)nk;
                ck = acc;
            }
        }
        if (ck < best_c) {
            best_c = ck;
            best_shape = shape;
            best_scale = kk;
        }
    }
    models[(u64)bi * 2 * C + p * C + g0 + lane] =
        rho | (mu2 << 3) | (best_shape << 10) | (best_scale << 11);
}

// ---------------------------------------------------------------------------------------------
// Encoder 3: rANS, one warp per block, the exact reverse of the decoder's order; words are
// written backwards into the block's scratch region of wcap words.
// enc[set][member][ri] = (start | freq << 12 | (shift - 31) << 25, rcp).
extern "C" __global__ void kv_rans_encode(const u8* __restrict__ res, u32 nl, u32 C, u32 T,
                                          u32 chunk, u32 nb, u32 layer0,
                                          const u8* __restrict__ set_of,
                                          const uint2* __restrict__ enc,
                                          const u32* __restrict__ models, u16* __restrict__ wbuf,
                                          u64 wcap, u32* __restrict__ wstart,
                                          u64* __restrict__ sizes, u32 models_len) {
    u32 lane = threadIdx.x & 31;
    u64 bi = ((u64)blockIdx.x * blockDim.x + threadIdx.x) >> 5;
    if (bi >= (u64)nl * nb) return;
    u32 li = (u32)(bi / nb), ch = (u32)(bi % nb);
    u32 n = min(chunk, T - ch * chunk);
    u32 l = layer0 + li;
    u32 G = (C + 31) / 32;
    u32 A = min(C, 32u);
    u16* wb = wbuf + bi * wcap;
    u64 pos = wcap;
    u32 x = RANS_L;
    u32 lt = lanemask_lt();
    const u8* blk = res + bi * 2 * (u64)chunk * C;
    for (int gi = 2 * G - 1; gi >= 0; gi--) {
        u32 p = gi / G, g0 = (gi % G) * 32, k = min(32u, C - g0);
        bool active = lane < k;
        u32 stream = p * C + g0 + lane;
        const uint2* tab = enc;
        if (active) {
            u32 m = models[bi * 2 * C + stream];
            u32 rv = 2 * (m & 7), mu2 = (m >> 3) & 127, shape = (m >> 10) & 1, scale = (m >> 11) & 63;
            u32 offset = rv == 0 ? (mu2 & 1) : 0;
            u32 member = (shape * NSCALES + scale) * 2 + offset;
            tab = enc + ((u64)set_of[l * 2 + p] * NMEM + member) * MAXR;
        }
        const u8* col = blk + (u64)p * n * C + g0 + lane;
        int t = (int)n - 1;
        // Eight tokens at a time: the loads are independent of the state chain.
        for (; t >= 7; t -= 8) {
            uint2 e[8];
#pragma unroll
            for (int u = 0; u < 8; u++) {
                u32 ri = active ? col[(u64)(t - u) * C] : 0;
                e[u] = active ? tab[ri] : make_uint2(0, 0);
            }
#pragma unroll
            for (int u = 0; u < 8; u++) {
                u32 f = (e[u].x >> 12) & 0x1fff;
                bool spill = active && x >= (f << 19);
                u32 mask = __ballot_sync(FULL, spill);
                u32 cnt = __popc(mask);
                if (spill) {
                    wb[pos - cnt + __popc(mask & lt)] = (u16)x;
                    x >>= 16;
                }
                pos -= cnt;
                if (active) {
                    u32 q = (u32)(((u64)x * e[u].y) >> (31 + (e[u].x >> 25)));
                    x = x + (e[u].x & 0xfff) + q * (4096 - f);
                }
            }
        }
        for (; t >= 0; t--) {
            u32 ri = active ? col[(u64)t * C] : 0;
            uint2 e = active ? tab[ri] : make_uint2(0, 0);
            u32 f = (e.x >> 12) & 0x1fff;
            bool spill = active && x >= (f << 19);
            u32 mask = __ballot_sync(FULL, spill);
            u32 cnt = __popc(mask);
            if (spill) {
                wb[pos - cnt + __popc(mask & lt)] = (u16)x;
                x >>= 16;
            }
            pos -= cnt;
            if (active) {
                u32 q = (u32)(((u64)x * e.y) >> (31 + (e.x >> 25)));
                x = x + (e.x & 0xfff) + q * (4096 - f);
            }
        }
    }
    pos -= 2 * A;
    if (lane < A) {
        wb[pos + 2 * lane] = (u16)(x >> 16);
        wb[pos + 2 * lane + 1] = (u16)x;
    }
    if (lane == 0) {
        wstart[bi] = (u32)pos;
        u64 W = wcap - pos;
        sizes[bi] = 24 + 4 * (u64)n + models_len + 4 + 2 * W;
    }
}

// ---------------------------------------------------------------------------------------------
// Exclusive scan of block sizes (one CTA of 1024 threads): offs[i] = base + sum(sizes[..i]),
// offs[count] = the end.
extern "C" __global__ void kv_scan(const u64* __restrict__ sizes, u32 count, u64 base,
                                   u64* __restrict__ offs) {
    __shared__ u64 part[32];
    __shared__ u64 carry;
    u32 tid = threadIdx.x, lane = tid & 31, wid = tid >> 5;
    if (tid == 0) carry = base;
    __syncthreads();
    for (u32 s = 0; s < count; s += 1024) {
        u32 i = s + tid;
        u64 v = i < count ? sizes[i] : 0;
        u64 incl = v;
        for (int o = 1; o < 32; o <<= 1) {
            u64 y = __shfl_up_sync(FULL, incl, o);
            if (lane >= (u32)o) incl += y;
        }
        if (lane == 31) part[wid] = incl;
        __syncthreads();
        if (wid == 0) {
            u64 q = part[lane];
            for (int o = 1; o < 32; o <<= 1) {
                u64 y = __shfl_up_sync(FULL, q, o);
                if (lane >= (u32)o) q += y;
            }
            part[lane] = q;
        }
        __syncthreads();
        u64 before = carry + (wid ? part[wid - 1] : 0) + incl - v;
        if (i < count) offs[i] = before;
        __syncthreads();
        if (tid == 1023) carry = before + v;
        __syncthreads();
    }
    if (tid == 0) offs[count] = carry;
}

// ---------------------------------------------------------------------------------------------
// Encoder 4: one CTA per block writes block header, scales, packed models, word count and
// words at its offset, then the block CRC32C.
extern "C" __global__ void kv_assemble(u8* __restrict__ out, const u64* __restrict__ offs,
                                       u32 nl, u32 C, u32 T, u32 chunk, u32 nb, u32 layer0,
                                       const u16* __restrict__ scales,
                                       const u32* __restrict__ models,
                                       const u16* __restrict__ wbuf, u64 wcap,
                                       const u32* __restrict__ wstart, u32 models_len,
                                       const u32* __restrict__ crc_tab,
                                       const u32* __restrict__ x2n) {
    __shared__ u32 tab[256];
    __shared__ u32 red[32];
    u32 bi = blockIdx.x;
    u32 tid = threadIdx.x;
    for (u32 i = tid; i < 256; i += blockDim.x) tab[i] = crc_tab[i];
    u32 li = bi / nb, ch = bi % nb;
    u32 n = min(chunk, T - ch * chunk);
    u8* blk = out + offs[bi];
    u64 size = offs[bi + 1] - offs[bi];
    u32 plen = (u32)(size - 24);
    u32 ws = wstart[bi];
    u32 W = (u32)(wcap - ws);
    const u16* words = wbuf + (u64)bi * wcap + ws;
    const u16* sk = scales + ((u64)li * 2) * T + (u64)ch * chunk;
    const u16* sv = scales + ((u64)li * 2 + 1) * T + (u64)ch * chunk;
    const u32* mdl = models + (u64)bi * 2 * C;
    u32 nstreams = 2 * C;
    u32 hdr[5] = {0x4257564bu, layer0 + li, ch * chunk, n, plen};
    u64 s_scales = 24, s_models = 24 + 4 * (u64)n, s_count = s_models + models_len,
        s_words = s_count + 4;
    for (u64 v = tid; v < size; v += blockDim.x) {
        u32 byte;
        if (v < 20) {
            byte = (hdr[v >> 2] >> (8 * (v & 3))) & 0xff;
        } else if (v < 24) {
            byte = 0;  // CRC, below
        } else if (v < s_models) {
            u64 o = v - s_scales;
            u32 tok = (u32)(o >> 1);
            u32 s = tok < n ? sk[tok] : sv[tok - n];
            byte = (s >> (8 * (o & 1))) & 0xff;
        } else if (v < s_count) {
            u64 bit = (v - s_models) * 8;
            u32 s = (u32)(bit / 17), sh = (u32)(bit - (u64)s * 17);
            u64 val = (u64)mdl[s] >> sh;
            if (s + 1 < nstreams) val |= (u64)mdl[s + 1] << (17 - sh);
            byte = (u32)val & 0xff;
            // Padding bits past the last stream are zero: the model values are < 2^17 and
            // nothing is or-ed in past stream 2C-1.
        } else if (v < s_words) {
            byte = (W >> (8 * (v - s_count))) & 0xff;
        } else {
            u64 o = v - s_words;
            byte = (words[o >> 1] >> (8 * (o & 1))) & 0xff;
        }
        blk[v] = (u8)byte;
    }
    __syncthreads();
    u32 crc = block_crc(blk, plen, red, tab, x2n);
    if (tid < 4) blk[20 + tid] = (u8)(crc >> (8 * tid));
}

// ---------------------------------------------------------------------------------------------
// Decoder 1: block CRC check, one CTA per block. blocks[bi] = byte offset of the block header
// in `in`; err[bi] |= 1 on mismatch.
extern "C" __global__ void kv_verify(const u8* __restrict__ in, const u64* __restrict__ blocks,
                                     u32* __restrict__ err, const u32* __restrict__ crc_tab,
                                     const u32* __restrict__ x2n) {
    __shared__ u32 tab[256];
    __shared__ u32 red[32];
    u32 bi = blockIdx.x, tid = threadIdx.x;
    for (u32 i = tid; i < 256; i += blockDim.x) tab[i] = crc_tab[i];
    __syncthreads();
    const u8* blk = in + blocks[bi];
    u32 plen = ld_u32(blk + 16);
    u32 want = ld_u32(blk + 20);
    u32 crc = block_crc(blk, plen, red, tab, x2n);
    if (tid == 0 && crc != want) err[bi] |= 1;
}

#define RING 1024

// Decoder 2: rANS decode + prediction + dequantization to f16, one warp per block.
// err bits: 2 CorruptStream, 4 SymbolOutOfRange, 8 model field invalid, 16 model padding,
// 32 Truncated (payload shorter than its fixed parts).
// MODE 0: `tab` is the u32 slot table per member (freq | offset << 13 | sym << 25).
// MODE 1: `tab` is a u8 symbol per slot and `info` (freq | start << 13) per residual, a
// quarter of the bytes, so more of the tables a block uses stay in L1.
// MODE 2: `tab` points to shared memory holding per member `mb` bytes: idx[64] (the residual
// of slot 64 b) then cum[stride] u16 (cumulative starts); a lookup is a bucket read and a
// binary search over the residuals that start inside the bucket (usually none).
template <int MODE>
__device__ void decode_block(const u8* __restrict__ in, const u64* __restrict__ blocks,
                             u32 nblocks, u32 C, u32 H, u32 T, u32 D, u32 vllm, u32 layer0,
                             const u8* __restrict__ bins, const u8* __restrict__ set_of,
                             const void* __restrict__ tab_all, const u32* __restrict__ info_all,
                             u32 mb, u8* wsm, u16* __restrict__ out, u32* __restrict__ err,
                             u32 models_len) {
    u32 lane = threadIdx.x & 31, wib = threadIdx.x >> 5;
    u16* ring = (u16*)wsm + wib * (RING + 128);  // RING words, then 64 floats
    float* lut = (float*)(ring + RING);  // 64 floats: (s - MAX) / MAX of the group's part
    u64 bi = ((u64)blockIdx.x * blockDim.x + threadIdx.x) >> 5;
    if (bi >= nblocks) return;
    const u8* blk = in + blocks[bi];
    u32 l = ld_u32(blk + 4);
    u32 t0 = ld_u32(blk + 8);
    u32 n = ld_u32(blk + 12);
    u32 plen = ld_u32(blk + 16);
    u32 li = l - layer0;
    const u8* pay = blk + 24;
    u32 A = min(C, 32u);
    u32 fixed = 4 * n + models_len + 4;
    if (plen < fixed) {
        if (lane == 0) err[bi] |= 32;
        return;
    }
    u32 W = ld_u32(pay + 4 * n + models_len);
    if (W < 2 * A || (u64)W * 2 != (u64)(plen - fixed)) {
        if (lane == 0) err[bi] |= 2;
        return;
    }
    const u8* models = pay + 4 * n;
    const u8* wp = pay + fixed;
    u32 G = (C + 31) / 32;
    u32 bad = 0;
    if (lane == 0) {
        u32 used = 2 * C * 17;
        if (used % 8 && (models[models_len - 1] >> (used % 8)) != 0) bad |= 16;
    }
    // Initial states, then the window of words [win, win + RING) in shared memory.
    u32 x = 0;
    if (lane < A) x = (ld_u16(wp + 4 * lane) << 16) | ld_u16(wp + 4 * lane + 2);
    u32 next = 2 * A;
    u32 win = 0xffffffffu;  // no window yet
    u32 lt = lanemask_lt();
    u32 lut_bins = 0;
    for (u32 gi = 0; gi < 2 * G; gi++) {
        u32 p = gi / G, g0 = (gi % G) * 32, k = min(32u, C - g0);
        bool active = lane < k;
        u32 b = bins[l * 2 + p];
        u32 w = b - 2;
        if (b != lut_bins) {
            float maxf = (float)(b / 2 - 1);
            __syncwarp();
            for (u32 i = lane; i <= w; i += 32) lut[i] = __fdiv_rn((float)i - maxf, maxf);
            __syncwarp();
            lut_bins = b;
        }
        u32 stream = p * C + g0 + lane;
        const u32* tab32 = (const u32*)tab_all;
        const u8* tab8 = (const u8*)tab_all;
        const u32* info = info_all;
        const u8* cidx = (const u8*)tab_all;
        const u16* cum = 0;
        u32 rho2 = 0, bias = 0, base = 0;
        u16* o = out;
        u64 ostep = 0;
        if (active) {
            u32 bit = stream * 17;
            // Four bytes from bit / 8 stay inside the payload: the word count follows.
            u32 m = (ld_u32(models + bit / 8) >> (bit % 8)) & 0x1ffff;
            u32 rho = m & 7, mu2 = (m >> 3) & 127, shape = (m >> 10) & 1, scale = (m >> 11) & 63;
            if (rho > 4 || mu2 > 2 * w || scale >= NSCALES) {
                bad |= 8;
                rho = min(rho, 4u);
                mu2 = min(mu2, 2 * w);
                scale = min(scale, 47u);
            }
            u32 rv = 2 * rho;
            base = rv == 0 ? mu2 >> 1 : (mu2 + 1) >> 1;
            rho2 = 2 * rv;
            bias = rv == 0 ? 16 * base : (8 - rv) * mu2 + 8;
            u32 offset = rv == 0 ? (mu2 & 1) : 0;
            u64 mem = (u64)set_of[l * 2 + p] * NMEM + (shape * NSCALES + scale) * 2 + offset;
            tab32 += mem * 4096;
            tab8 += mem * 4096;
            info += mem * MAXR;
            cidx += mem * mb;
            cum = (const u16*)(cidx + 64);
            u32 c = g0 + lane;
            o = out + elem_index(li, p, t0, c, H, T, D, vllm);
            ostep = vllm ? C : D;
        }
        const u8* sc = pay + 2 * (u64)p * n;
        for (u32 t = 0; t < n; t++) {
            if (win == 0xffffffffu || next + 32 > win + RING) {
                __syncwarp();
                win = next;
                for (u32 i = lane; i < RING; i += 32) {
                    u32 wi = win + i;
                    ring[i] = wi < W ? (u16)ld_u16(wp + 2 * (u64)wi) : 0;
                }
                __syncwarp();
            }
            u32 r = 0;
            bool need = false;
            if (active) {
                u32 slot = x & 4095;
                if (MODE == 2) {
                    u32 bk = slot >> 6;
                    u32 lo = cidx[bk], hi = bk == 63 ? 2 * w : cidx[bk + 1];
                    while (lo < hi) {
                        u32 mid = (lo + hi + 1) >> 1;
                        if (cum[mid] <= slot) lo = mid;
                        else hi = mid - 1;
                    }
                    u32 st = cum[lo];
                    r = lo;
                    x = ((u32)cum[lo + 1] - st) * (x >> 12) + slot - st;
                } else if (MODE == 1) {
                    r = tab8[slot];
                    u32 e = info[r];
                    x = (e & 0x1fff) * (x >> 12) + slot - (e >> 13);
                } else {
                    u32 e = tab32[slot];
                    r = e >> 25;
                    x = (e & 0x1fff) * (x >> 12) + ((e >> 13) & 0xfff);
                }
                need = x < RANS_L;
            }
            u32 mask = __ballot_sync(FULL, need);
            if (need) x = (x << 16) | ring[next + __popc(mask & lt) - win];
            next += __popc(mask);
            if (active) {
                int s = (int)(base + r) - (int)w;
                if (s < 0 || s > (int)w) {
                    bad |= 4;
                    s = s < 0 ? 0 : (int)w;
                }
                base = (rho2 * (u32)s + bias) >> 4;
                float m = h2f((u16)ld_u16(sc + 2 * t));
                o[(u64)t * ostep] = f2h(__fmul_rn(lut[s], m));
            }
        }
    }
    if (lane < A && x != RANS_L) bad |= 2;
    if (next != W) bad |= 2;
    bad = __reduce_or_sync(FULL, bad);
    if (lane == 0 && bad) atomicOr(&err[bi], bad);
}

extern "C" __global__ void kv_decode(const u8* __restrict__ in, const u64* __restrict__ blocks,
                                     u32 nblocks, u32 C, u32 H, u32 T, u32 D, u32 vllm,
                                     u32 layer0, const u8* __restrict__ bins,
                                     const u8* __restrict__ set_of, const u32* __restrict__ slots,
                                     u16* __restrict__ out, u32* __restrict__ err,
                                     u32 models_len) {
    extern __shared__ __align__(16) u8 dyn_smem[];
    decode_block<0>(in, blocks, nblocks, C, H, T, D, vllm, layer0, bins, set_of, slots, 0, 0,
                    dyn_smem, out, err, models_len);
}

extern "C" __global__ void kv_decode_small(const u8* __restrict__ in,
                                           const u64* __restrict__ blocks, u32 nblocks, u32 C,
                                           u32 H, u32 T, u32 D, u32 vllm, u32 layer0,
                                           const u8* __restrict__ bins,
                                           const u8* __restrict__ set_of,
                                           const u8* __restrict__ sym8,
                                           const u32* __restrict__ info, u16* __restrict__ out,
                                           u32* __restrict__ err, u32 models_len) {
    extern __shared__ __align__(16) u8 dyn_smem[];
    decode_block<1>(in, blocks, nblocks, C, H, T, D, vllm, layer0, bins, set_of, sym8, info, 0,
                    dyn_smem, out, err, models_len);
}

// The compact tables of every set (`tbytes` bytes, a multiple of 16) are copied into shared
// memory first; the warps' windows follow them.
extern "C" __global__ void kv_decode_shared(const u8* __restrict__ in,
                                            const u64* __restrict__ blocks, u32 nblocks, u32 C,
                                            u32 H, u32 T, u32 D, u32 vllm, u32 layer0,
                                            const u8* __restrict__ bins,
                                            const u8* __restrict__ set_of,
                                            const uint4* __restrict__ ctab, u32 tbytes, u32 mb,
                                            u16* __restrict__ out, u32* __restrict__ err,
                                            u32 models_len) {
    extern __shared__ __align__(16) u8 dyn_smem[];
    uint4* s4 = (uint4*)dyn_smem;
    for (u32 i = threadIdx.x; i < tbytes / 16; i += blockDim.x) s4[i] = ctab[i];
    __syncthreads();
    decode_block<2>(in, blocks, nblocks, C, H, T, D, vllm, layer0, bins, set_of, dyn_smem, 0, mb,
                    dyn_smem + tbytes, out, err, models_len);
}
