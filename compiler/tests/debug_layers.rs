//! Diagnostics: per-layer relative error between compiler and runtime (run with --ignored).
mod common;
use amend_compiler::forward::{Capture, Model as Forward};
use amend_runtime::{FnHook, HookPoint, Logits, Session, SessionOptions, Site};
use std::sync::{Arc, Mutex};

#[test]
#[ignore]
fn per_layer_error() {
    let Some(path) = common::real_model_path() else {
        return;
    };
    let rt = common::open_runtime(&path);
    let mut fwd = Forward::load(&path).unwrap();
    fwd.emulate_device = std::env::var("EMU").is_ok();
    eprintln!("{:?}", fwd.cfg);
    let mut s = Session::new(
        &rt,
        SessionOptions {
            n_ctx: 512,
            ..Default::default()
        },
    )
    .unwrap();
    let toks = s.tokenize("The Eiffel Tower is located in", true).unwrap();
    let n = fwd.cfg.n_layer as u32;
    let mut points = vec![HookPoint::new(0, Site::Embeddings)];
    for l in 0..n {
        for site in [
            Site::AttnOutput,
            Site::FfnInput,
            Site::FfnOutput,
            Site::ResidualOut,
        ] {
            points.push(HookPoint::new(l, site));
        }
    }
    type Rows = Vec<(HookPoint, Vec<f32>)>;
    let got: Arc<Mutex<Rows>> = Arc::default();
    let g2 = got.clone();
    s.add_hook(Box::new(FnHook::new(points.clone(), move |p, rows| {
        if rows.n_rows() > 0 {
            let r = rows.n_rows() - 1;
            g2.lock().unwrap().push((p, rows.row(r).to_vec()));
        }
    })))
    .unwrap();
    s.prefill(&toks, Logits::Last).unwrap();
    let ids: Vec<u32> = toks.iter().map(|&t| t as u32).collect();
    let mut cap = Capture::sites(&points);
    fwd.forward(&ids, &mut cap, &[ids.len() - 1]).unwrap();
    // Isolate the FFN of layer L: feed the runtime's FfnInput rows (last row only) and compare.
    struct Feed(HookPoint, Vec<f32>);
    impl amend_compiler::forward::Hooks for Feed {
        fn at(
            &mut self,
            p: HookPoint,
            x: &candle_core::Tensor,
        ) -> amend_compiler::error::Result<Option<candle_core::Tensor>> {
            if p != self.0 {
                return Ok(None);
            }
            let t = x.dim(0)?;
            let row = candle_core::Tensor::new(self.1.as_slice(), x.device())?;
            Ok(Some(amend_compiler::forward::replace_row(x, t - 1, &row)?))
        }
    }
    for l in [0u32, 1, 5, 12] {
        let fin = got
            .lock()
            .unwrap()
            .iter()
            .find(|(p, _)| *p == HookPoint::new(l, Site::FfnInput))
            .unwrap()
            .1
            .clone();
        let fout = got
            .lock()
            .unwrap()
            .iter()
            .find(|(p, _)| *p == HookPoint::new(l, Site::FfnOutput))
            .unwrap()
            .1
            .clone();
        let mut feed = Feed(HookPoint::new(l, Site::FfnInput), fin);
        let mut cap2 = Capture::sites(&[HookPoint::new(l, Site::FfnOutput)]);
        let mut list = amend_compiler::forward::HookList(vec![&mut feed, &mut cap2]);
        fwd.forward(&ids, &mut list, &[ids.len() - 1]).unwrap();
        let t = &cap2.at[&HookPoint::new(l, Site::FfnOutput)];
        let row = t
            .get(t.dim(0).unwrap() - 1)
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        let num: f32 = row
            .iter()
            .zip(&fout)
            .map(|(a, b)| (a - b) * (a - b))
            .sum::<f32>()
            .sqrt();
        let den: f32 = fout.iter().map(|b| b * b).sum::<f32>().sqrt();
        eprintln!("FFN alone at {l}: rel err {:.2e}", num / den);
    }
    for (p, want) in got.lock().unwrap().iter() {
        let t = &cap.at[p];
        let row = t
            .get(t.dim(0).unwrap() - 1)
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        let num: f32 = row
            .iter()
            .zip(want)
            .map(|(a, b)| (a - b) * (a - b))
            .sum::<f32>()
            .sqrt();
        let den: f32 = want.iter().map(|b| b * b).sum::<f32>().sqrt();
        eprintln!("{p}: rel err {:.2e} (norm {:.1})", num / den, den);
    }
}
