//! The BEAM layer against Hugging Face `transformers`' own MoE blocks.
//!
//! Fixtures: `assets/fixtures/blocks/*.safetensors`, made by `scripts/gen_block_fixtures.py`
//! (transformers 5.24, torch 2.15) from tiny random configs of every supported routing rule.
//! Tolerance: 1e-5 absolute on block outputs and routing weights (f32 on both sides).

mod common;

use std::collections::BTreeMap;

use beam_model::checkpoint::TensorStore;
use beam_model::model::family::{Family, MoeTensorNames};
use beam_model::model::load::load_moe_block;
use beam_model::{
    BeamMaskConfig, BeamMoe, BeamMoeConfig, GroupLimit, MaskSource, RoutingRule, SharedExpertConfig,
};
use burn::backend::NdArray;
use burn::tensor::{Int, Tensor, TensorData};
use common::{assert_close, int_values, repo_root, values};
use serde_json::Value;

type B = NdArray<f32>;
const TOL: f64 = 1e-5;

struct Case {
    meta: Value,
    file: TensorStore,
}

impl Case {
    fn name(&self) -> &str {
        self.meta["name"].as_str().unwrap()
    }

    fn family(&self) -> &str {
        self.meta["family"].as_str().unwrap()
    }

    fn usize(&self, key: &str) -> usize {
        self.meta[key].as_u64().unwrap_or_else(|| panic!("{key}")) as usize
    }

    fn is_deepseek(&self) -> bool {
        self.family().starts_with("deepseek")
    }

    fn config(&self, renormalize: bool) -> BeamMoeConfig {
        let meta = &self.meta;
        let normalize = meta["norm_topk_prob"].as_bool().unwrap_or(false);
        let scale = meta["routed_scaling_factor"].as_f64().unwrap_or(1.0);
        let group = || GroupLimit::new(self.usize("n_group"), self.usize("topk_group"));
        let routing = match self.family() {
            "qwen2_moe" | "qwen3_moe" | "olmoe" => RoutingRule::softmax(normalize),
            "mixtral" => RoutingRule::mixtral(),
            "deepseek_v2" => RoutingRule::DeepSeekV2 {
                group: (meta["topk_method"] == "group_limited_greedy").then(group),
                routed_scaling_factor: scale,
            },
            "deepseek_v3" => RoutingRule::DeepSeekV3 {
                group: group(),
                normalize_top_k: normalize,
                routed_scaling_factor: scale,
            },
            other => panic!("unknown family {other}"),
        };
        let shared = meta["shared"].as_str().map(|kind| {
            SharedExpertConfig::new(self.usize("shared_intermediate")).with_gated(kind == "qwen2")
        });
        BeamMoeConfig::new(
            self.usize("hidden_size"),
            self.usize("intermediate_size"),
            self.usize("num_experts"),
            self.usize("top_k"),
        )
        .with_routing(routing)
        .with_shared_expert(shared)
        .with_beam(Some(BeamMaskConfig::new().with_renormalize(renormalize)))
    }

    fn layer(&self, renormalize: bool) -> BeamMoe<B> {
        let layer = self.config(renormalize).init::<B>(&Default::default());
        let names = match Family::from_model_type(self.family()) {
            Some(family) => family.moe_names(),
            None if self.is_deepseek() => MoeTensorNames::DEEPSEEK,
            None => panic!("{}: unknown family", self.name()),
        };
        load_moe_block(
            layer,
            &self.file,
            self.meta["prefix"].as_str().unwrap(),
            &names,
        )
        .unwrap_or_else(|err| panic!("{}: {err}", self.name()))
    }

    fn tensor<const D: usize>(&self, name: &str) -> Tensor<B, D> {
        let shape: [usize; D] = self.file.shape(name).unwrap().try_into().unwrap();
        self.file.tensor(name, shape, &Default::default()).unwrap()
    }

    fn expected(&self, name: &str) -> Vec<f64> {
        let shape = self.file.shape(name).unwrap();
        let values = self.file.f32_values(name, &shape).unwrap();
        values.into_iter().map(f64::from).collect()
    }

    /// The fixture's `[T, E]` (token, expert) mask as a `[B, S, K]` slot mask for our slots.
    fn slot_mask(&self, expert_ids: Tensor<B, 3, Int>) -> Tensor<B, 3> {
        let [b, s, k] = expert_ids.dims();
        let expert_mask = self.tensor::<2>("expert_mask");
        expert_mask
            .gather(1, expert_ids.reshape([b * s, k]))
            .reshape([b, s, k])
    }
}

fn cases() -> Vec<Case> {
    let dir = repo_root().join("assets/fixtures/blocks");
    let index: Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("cases.json")).unwrap()).unwrap();
    let cases: Vec<Case> = index["cases"]
        .as_array()
        .unwrap()
        .iter()
        .map(|meta| Case {
            file: TensorStore::open(
                dir.join(format!("{}.safetensors", meta["name"].as_str().unwrap())),
            )
            .unwrap(),
            meta: meta.clone(),
        })
        .collect();
    let families: std::collections::BTreeSet<_> =
        cases.iter().map(|c| c.family().to_string()).collect();
    assert_eq!(
        families.into_iter().collect::<Vec<_>>(),
        [
            "deepseek_v2",
            "deepseek_v3",
            "mixtral",
            "olmoe",
            "qwen2_moe",
            "qwen3_moe"
        ],
        "every routing family has fixtures"
    );
    assert_eq!(cases.len(), 9);
    cases
}

/// `{expert: weight}` per token.
fn routing_by_token(ids: &[i64], weights: &[f64], k: usize) -> Vec<BTreeMap<i64, f64>> {
    ids.chunks(k)
        .zip(weights.chunks(k))
        .map(|(i, w)| i.iter().copied().zip(w.iter().copied()).collect())
        .collect()
}

#[test]
fn each_routing_rule_matches_transformers() {
    for case in cases() {
        let name = case.name().to_string();
        let layer = case.layer(false);
        let x = case.tensor::<3>("x");
        let out = layer.forward_with(x, MaskSource::TopK);
        assert_close(
            &values(out.output),
            &case.expected("out"),
            TOL,
            &format!("{name}: block output"),
        );
        assert_close(
            &values(out.facts.router_logits.clone()),
            &case.expected("router_logits"),
            TOL,
            &format!("{name}: router logits"),
        );

        let k = case.usize("top_k");
        let ids = int_values(out.facts.expert_ids.clone());
        let (hf_ids, _) = case.file.i64_values("topk_ids").unwrap();
        let weights = values(out.facts.topk_weights.clone());
        let hf_weights = case.expected("topk_weights");
        if case.is_deepseek() {
            // DeepSeek's top-k is unsorted: compare the chosen experts as sets, weights by expert.
            let ours = routing_by_token(&ids, &weights, k);
            let theirs = routing_by_token(&hf_ids, &hf_weights, k);
            for (t, (a, b)) in ours.iter().zip(&theirs).enumerate() {
                assert_eq!(
                    a.keys().collect::<Vec<_>>(),
                    b.keys().collect::<Vec<_>>(),
                    "{name}: token {t} experts"
                );
                for (e, w) in a {
                    assert!(
                        (w - b[e]).abs() <= TOL,
                        "{name}: token {t} expert {e}: {w} vs {}",
                        b[e]
                    );
                }
            }
        } else {
            assert_eq!(
                ids, hf_ids,
                "{name}: chosen experts (sorted by probability)"
            );
            assert_close(
                &weights,
                &hf_weights,
                TOL,
                &format!("{name}: routing weights"),
            );
        }

        // transformers' load-balance loss re-derives the top-k from softmax(logits): comparable
        // where that is the rule's own choice.
        let softmax_choice = matches!(
            layer.router.rule(),
            RoutingRule::Softmax { .. } | RoutingRule::DeepSeekV2 { group: None, .. }
        );
        if softmax_choice {
            assert_close(
                &values(out.facts.load_balance_loss()),
                &case.expected("lb_loss"),
                TOL,
                &format!("{name}: load-balance loss"),
            );
        }
    }
}

#[test]
fn fixed_masks_match_transformers_with_masked_weights_zeroed() {
    for case in cases() {
        for (renormalize, reference) in [(false, "out_masked"), (true, "out_masked_renorm")] {
            let name = format!("{} ({reference})", case.name());
            let layer = case.layer(renormalize);
            let x = case.tensor::<3>("x");
            let top_k = layer.forward_with(x.clone(), MaskSource::TopK);
            let mask = case.slot_mask(top_k.facts.expert_ids);
            let out = layer.forward_with(x.clone(), MaskSource::External(mask.clone()));
            let got = values(out.output);
            assert_close(&got, &case.expected(reference), TOL, &name);

            // Token 0 has every slot masked: exactly the shared expert's output (or zero).
            let hidden = case.usize("hidden_size");
            let shared = match &layer.shared_expert {
                // Run on the same rows as the layer (the host kernels' summation order depends
                // on how many rows share a weight block), then token 0's row.
                Some(shared) => {
                    values(shared.forward(x.reshape([-1, hidden as i32])))[..hidden].to_vec()
                }
                None => vec![0.0; hidden],
            };
            assert_eq!(
                values(mask.narrow(0, 0, 1).narrow(1, 0, 1).sum()),
                vec![0.0],
                "{name}: token 0 fully masked"
            );
            assert_eq!(&got[..hidden], &shared[..], "{name}: all-masked token");
            assert_eq!(
                out.facts.kept_pairs(),
                values(out.facts.mask.clone().sum())[0] as usize
            );
        }
    }
}

#[test]
fn fresh_mask_router_keeps_everything_and_reproduces_top_k_exactly() {
    for case in cases() {
        for renormalize in [false, true] {
            let layer = case.layer(renormalize);
            let x = case.tensor::<3>("x");
            let learned = layer.forward(x.clone());
            let top_k = layer.forward_with(x, MaskSource::TopK);
            let tokens = learned.facts.tokens();
            assert_eq!(learned.facts.kept_pairs(), tokens * case.usize("top_k"));
            assert_eq!(
                values(learned.output.clone()),
                values(top_k.output),
                "{}",
                case.name()
            );
            assert_close(
                &values(learned.output),
                &case.expected("out"),
                TOL,
                case.name(),
            );
        }
    }
}

#[test]
fn learned_mask_equals_the_same_mask_given_externally() {
    // Bias +3 on even experts, −3 on odd ones, zero weights: the mask router keeps exactly the
    // even experts of every token.
    for case in cases() {
        let mut layer = case.layer(true);
        let experts = case.usize("num_experts");
        let bias: Vec<f32> = (0..experts)
            .map(|e| if e % 2 == 0 { 3.0 } else { -3.0 })
            .collect();
        let mask_router = layer.mask_router.as_mut().unwrap();
        mask_router.proj.bias = Some(burn::module::Param::from_tensor(Tensor::from_data(
            TensorData::new(bias, [experts]),
            &Default::default(),
        )));
        let x = case.tensor::<3>("x");
        let learned = layer.forward(x.clone());
        let ids = int_values(learned.facts.expert_ids.clone());
        let expected_mask: Vec<f64> = ids
            .iter()
            .map(|e| if e % 2 == 0 { 1.0 } else { 0.0 })
            .collect();
        assert_eq!(
            values(learned.facts.mask.clone()),
            expected_mask,
            "{}",
            case.name()
        );
        let external = layer.forward_with(x, MaskSource::External(learned.facts.mask.clone()));
        assert_eq!(
            values(learned.output),
            values(external.output),
            "{}",
            case.name()
        );
        let kept = expected_mask.iter().sum::<f64>() as usize;
        assert_eq!(learned.facts.kept_pairs(), kept);
        assert_eq!(learned.facts.kept_pair_list().len(), kept);
        assert!(learned
            .facts
            .kept_pair_list()
            .iter()
            .all(|(_, expert)| expert % 2 == 0));
    }
}
