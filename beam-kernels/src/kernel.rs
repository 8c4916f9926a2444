//! The cubecl kernels. Launch code and shapes: [`crate::cubecl`]; host references:
//! [`crate::reference`].
//!
//! Buffers are contiguous and indexed flat. Routing ids may be any integer type; an id that is not
//! below `num_experts` once cast to `u32` (the sentinel `E`, or a negative id) is a masked slot.
//! Products are accumulated in `f32` whatever the storage float type.

use cubecl::prelude::*;

/// Threads of a GEMV cube sharing one weight row (each reads a strided part of the row).
pub const GEMV_LANES: u32 = 32;
/// Weight rows per GEMV cube.
pub const GEMV_ROWS: u32 = 8;
/// Tokens (pair rows) per tile of the tiled kernel.
pub const TILE_M: usize = 64;
/// Output features per tile of the tiled kernel.
pub const TILE_N: usize = 64;
/// Reduction depth of one shared-memory stage of the tiled kernel.
pub const TILE_K: usize = 16;
/// Threads per tiled cube along each axis; each thread owns a 4 × 4 block of the tile.
pub const TILE_THREADS: u32 = 16;
const MICRO: usize = 4;
// Row pitch of the shared tiles: one pad column keeps the per-thread column reads conflict-free.
const PITCH: usize = TILE_K + 1;

/// Routing compaction, one cube: counts kept slots per expert, prefix-sums the counts into
/// `offsets` (length E + 1) and writes each expert's slots in ascending order into `pairs`; the
/// tail `pairs[offsets[E]..]` gets the sentinel `num_slots`.
///
/// Work item `j = e · parts + p` scans chunk `p` of the slots for expert `e`; the exclusive scan
/// over items in that order keeps each expert's slots ascending, so the result is deterministic and
/// equal to [`crate::plan::DispatchPlan`].
#[cube(launch)]
pub fn compact_routes_kernel<I: Int>(
    expert_ids: &Tensor<I>,
    offsets: &mut Tensor<u32>,
    pairs: &mut Tensor<u32>,
    num_slots: u32,
    num_experts: u32,
    #[comptime] parts: usize,
    #[comptime] items: usize,
    #[define(I)] _dtype: StorageType,
) {
    let threads = CUBE_DIM_X as usize;
    let slots = num_slots as usize;
    let chunk = slots.div_ceil(parts);
    // counts[items] carries the kept total to every thread (global writes are not visible
    // across the cube after a barrier on every backend; shared memory is).
    let mut counts = SharedMemory::<u32>::new(items + 1);

    let mut item = UNIT_POS_X as usize;
    while item < items {
        let expert = (item / parts) as u32;
        let begin = (item % parts) * chunk;
        let mut end = begin + chunk;
        if end > slots {
            end = slots;
        }
        let mut count = 0u32;
        for slot in begin..end {
            if u32::cast_from(expert_ids[slot]) == expert {
                count += 1;
            }
        }
        counts[item] = count;
        item += threads;
    }
    sync_cube();

    if UNIT_POS_X == 0 {
        let mut total = 0u32;
        for item in 0..items {
            let count = counts[item];
            counts[item] = total;
            if item % parts == 0 {
                offsets[item / parts] = total;
            }
            total += count;
        }
        offsets[num_experts as usize] = total;
        counts[items] = total;
    }
    sync_cube();

    let mut item = UNIT_POS_X as usize;
    while item < items {
        let expert = (item / parts) as u32;
        let begin = (item % parts) * chunk;
        let mut end = begin + chunk;
        if end > slots {
            end = slots;
        }
        let mut next = counts[item] as usize;
        for slot in begin..end {
            if u32::cast_from(expert_ids[slot]) == expert {
                pairs[next] = slot as u32;
                next += 1;
            }
        }
        item += threads;
    }

    let mut tail = counts[items] as usize + UNIT_POS_X as usize;
    while tail < slots {
        pairs[tail] = num_slots;
        tail += threads;
    }
}

/// `silu(g) · u` in `f32`.
#[cube]
fn silu_mul(gate: f32, up: f32) -> f32 {
    gate / (1.0 + f32::exp(-gate)) * up
}

/// Decode regime (few tokens per expert): one cube per (block of [`GEMV_ROWS`] output rows,
/// expert); [`GEMV_LANES`] threads split each weight row with vectorised loads and reduce in shared
/// memory. Every weight row of an expert with tokens is read once per token (re-reads of the same
/// row hit the cache); experts without kept pairs exit before reading anything.
///
/// `gated` (gate+up phase): `input` is `x` `[T, H]`, `weight` is `gate_up` `[E, 2I, H]`, output
/// row `p` (pair position) of `hidden` `[T·K, I]` gets `silu(gate · x) ⊙ (up · x)`.
/// Not `gated` (down phase): `input` is `hidden`, `weight` is `down` `[E, H, I]`, output row
/// `slot` of `[T·K, H]` gets `routing_weight[slot] · (down · h)`.
#[cube(launch)]
pub fn expert_gemv_kernel<F: Float, N: Size>(
    input: &Tensor<Vector<F, N>>,
    weight: &Tensor<Vector<F, N>>,
    routing_weights: &Tensor<F>,
    offsets: &Tensor<u32>,
    pairs: &Tensor<u32>,
    output: &mut Tensor<F>,
    in_vectors: u32,
    out_features: u32,
    top_k: u32,
    #[comptime] gated: bool,
    #[define(F)] _dtype: StorageType,
) {
    let expert = CUBE_POS_Y as usize;
    let start = offsets[expert] as usize;
    let end = offsets[expert + 1] as usize;
    if start == end {
        terminate!();
    }
    let lanes = CUBE_DIM_X as usize;
    let lane = UNIT_POS_X as usize;
    let local_row = UNIT_POS_Y as usize;
    let row = CUBE_POS_X as usize * CUBE_DIM_Y as usize + local_row;
    let out_features = out_features as usize;
    let in_vectors = in_vectors as usize;
    let row_valid = row < out_features;
    let rows_per_expert = if gated {
        2 * out_features
    } else {
        out_features
    };
    let first_row = (expert * rows_per_expert + row) * in_vectors;
    let second_row = first_row + out_features * in_vectors;
    let vector_size = input.vector_size().comptime();

    let mut partial_a = SharedMemory::<f32>::new(GEMV_LANES as usize * GEMV_ROWS as usize);
    let mut partial_b = SharedMemory::<f32>::new(GEMV_LANES as usize * GEMV_ROWS as usize);
    let cell = local_row * lanes + lane;

    for position in start..end {
        let slot = pairs[position] as usize;
        let in_token = if gated {
            slot / top_k as usize
        } else {
            position
        };
        let in_row = in_token * in_vectors;
        let mut acc_a = Vector::<f32, N>::new(0.0);
        let mut acc_b = Vector::<f32, N>::new(0.0);
        if row_valid {
            let mut v = lane;
            while v < in_vectors {
                let x = Vector::<f32, N>::cast_from(input[in_row + v]);
                acc_a += Vector::<f32, N>::cast_from(weight[first_row + v]) * x;
                if gated {
                    acc_b += Vector::<f32, N>::cast_from(weight[second_row + v]) * x;
                }
                v += lanes;
            }
        }
        let mut sum_a = 0.0f32;
        let mut sum_b = 0.0f32;
        #[unroll]
        for l in 0..vector_size {
            sum_a += acc_a[l];
            sum_b += acc_b[l];
        }
        partial_a[cell] = sum_a;
        partial_b[cell] = sum_b;
        sync_cube();

        let mut stride = lanes / 2;
        while stride > 0 {
            if lane < stride {
                partial_a[cell] += partial_a[cell + stride];
                if gated {
                    partial_b[cell] += partial_b[cell + stride];
                }
            }
            sync_cube();
            stride /= 2;
        }

        if lane == 0 && row_valid {
            if gated {
                output[position * out_features + row] =
                    F::cast_from(silu_mul(partial_a[cell], partial_b[cell]));
            } else {
                let scale = f32::cast_from(routing_weights[slot]);
                output[slot * out_features + row] = F::cast_from(partial_a[cell] * scale);
            }
        }
        // Nobody overwrites the partial sums before lane 0 has read them.
        sync_cube();
    }
}

/// Prefill regime (many tokens per expert): a shared-memory tiled GEMM per expert. Cube
/// `(n, m, e)` computes output features `n·TILE_N..` for pair rows `m·TILE_M..` of expert `e`
/// (and every further `m + count_m`-th row tile, so any number of pairs is covered); each weight
/// tile is read once per row tile instead of once per token. Same `gated` contract as
/// [`expert_gemv_kernel`]; `inner` is the reduction length (H, or I for the down phase).
#[cube(launch)]
pub fn expert_tile_kernel<F: Float>(
    input: &Tensor<F>,
    weight: &Tensor<F>,
    routing_weights: &Tensor<F>,
    offsets: &Tensor<u32>,
    pairs: &Tensor<u32>,
    output: &mut Tensor<F>,
    inner: u32,
    out_features: u32,
    top_k: u32,
    #[comptime] gated: bool,
    #[define(F)] _dtype: StorageType,
) {
    let expert = CUBE_POS_Z as usize;
    let start = offsets[expert] as usize;
    let end = offsets[expert + 1] as usize;
    let inner = inner as usize;
    let out_features = out_features as usize;
    let top_k = top_k as usize;
    let tx = UNIT_POS_X as usize;
    let ty = UNIT_POS_Y as usize;
    let threads = (TILE_THREADS * TILE_THREADS) as usize;
    let tid = ty * TILE_THREADS as usize + tx;
    let n0 = CUBE_POS_X as usize * TILE_N;
    let rows_per_expert = if gated {
        2 * out_features
    } else {
        out_features
    };
    let weight_base = expert * rows_per_expert * inner;

    let mut tile_in = SharedMemory::<f32>::new(TILE_M * PITCH);
    let mut tile_a = SharedMemory::<f32>::new(TILE_N * PITCH);
    let mut tile_b = SharedMemory::<f32>::new(TILE_N * PITCH);

    let mut m0 = start + CUBE_POS_Y as usize * TILE_M;
    while m0 < end {
        let mut acc_a = Array::<f32>::new(MICRO * MICRO);
        let mut acc_b = Array::<f32>::new(MICRO * MICRO);
        #[unroll]
        for c in 0..MICRO * MICRO {
            acc_a[c] = 0.0;
            acc_b[c] = 0.0;
        }

        let mut k0 = 0usize;
        while k0 < inner {
            // Stage a TILE_M × TILE_K block of input rows and TILE_N × TILE_K of weight rows.
            #[unroll]
            for q in 0..(TILE_M * TILE_K) / 256 {
                let index = tid + threads * q;
                let r = index / TILE_K;
                let kk = index % TILE_K;
                let k = k0 + kk;
                let position = m0 + r;
                let mut value = 0.0f32;
                if position < end && k < inner {
                    let in_row = if gated {
                        pairs[position] as usize / top_k
                    } else {
                        position
                    };
                    value = f32::cast_from(input[in_row * inner + k]);
                }
                tile_in[r * PITCH + kk] = value;

                let n = n0 + r;
                let mut a = 0.0f32;
                let mut b = 0.0f32;
                if n < out_features && k < inner {
                    a = f32::cast_from(weight[weight_base + n * inner + k]);
                    if gated {
                        b = f32::cast_from(weight[weight_base + (out_features + n) * inner + k]);
                    }
                }
                tile_a[r * PITCH + kk] = a;
                tile_b[r * PITCH + kk] = b;
            }
            sync_cube();

            #[unroll]
            for kk in 0..TILE_K {
                let mut rows = Array::<f32>::new(MICRO);
                let mut cols_a = Array::<f32>::new(MICRO);
                let mut cols_b = Array::<f32>::new(MICRO);
                #[unroll]
                for i in 0..MICRO {
                    rows[i] = tile_in[(ty + TILE_THREADS as usize * i) * PITCH + kk];
                    cols_a[i] = tile_a[(tx + TILE_THREADS as usize * i) * PITCH + kk];
                    cols_b[i] = tile_b[(tx + TILE_THREADS as usize * i) * PITCH + kk];
                }
                #[unroll]
                for i in 0..MICRO {
                    #[unroll]
                    for j in 0..MICRO {
                        acc_a[i * MICRO + j] += rows[i] * cols_a[j];
                        if gated {
                            acc_b[i * MICRO + j] += rows[i] * cols_b[j];
                        }
                    }
                }
            }
            sync_cube();
            k0 += TILE_K;
        }

        #[unroll]
        for i in 0..MICRO {
            let position = m0 + ty + TILE_THREADS as usize * i;
            if position < end {
                let slot = pairs[position] as usize;
                #[unroll]
                for j in 0..MICRO {
                    let n = n0 + tx + TILE_THREADS as usize * j;
                    if n < out_features {
                        if gated {
                            output[position * out_features + n] =
                                F::cast_from(silu_mul(acc_a[i * MICRO + j], acc_b[i * MICRO + j]));
                        } else {
                            let scale = f32::cast_from(routing_weights[slot]);
                            output[slot * out_features + n] =
                                F::cast_from(acc_a[i * MICRO + j] * scale);
                        }
                    }
                }
            }
        }
        m0 += CUBE_COUNT_Y as usize * TILE_M;
    }
}

/// Deterministic combine: `out[t, j] = Σ_k y[t·K + k, j]` over kept slots, in slot order (no
/// atomics). Masked slots' rows of `y` are never written and never read.
#[cube(launch)]
pub fn combine_kernel<F: Float, I: Int>(
    expert_ids: &Tensor<I>,
    expert_outputs: &Tensor<F>,
    output: &mut Tensor<F>,
    hidden: u32,
    top_k: u32,
    num_experts: u32,
    #[define(F, I)] _dtypes: [StorageType; 2],
) {
    let position = ABSOLUTE_POS;
    if position >= output.len() {
        terminate!();
    }
    let hidden = hidden as usize;
    let top_k = top_k as usize;
    let token = position / hidden;
    let feature = position % hidden;
    let mut sum = 0.0f32;
    for k in 0..top_k {
        let slot = token * top_k + k;
        if u32::cast_from(expert_ids[slot]) < num_experts {
            sum += f32::cast_from(expert_outputs[slot * hidden + feature]);
        }
    }
    output[position] = F::cast_from(sum);
}
